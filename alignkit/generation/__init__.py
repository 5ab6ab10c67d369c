"""Batched generation: KV-cache decoding, n samples per prompt, and the log-probs RL needs."""

from __future__ import annotations

from alignkit.generation.engine import Completion, generate
from alignkit.generation.sampling import SamplingParams, process_logits, sample

__all__ = ["Completion", "SamplingParams", "generate", "process_logits", "sample"]
