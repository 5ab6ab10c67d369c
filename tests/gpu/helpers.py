"""What the GPU tests share: the skip marker, a small GQA model config, and exact fp32 matmuls on CUDA.

Every check is written as a function of a device and compares that device with the CPU, so the same code runs
(trivially, CPU against CPU) on a machine without a GPU while it is being written; the tests call it on "cuda".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from alignkit.model import ModelConfig

# Every test module sets `pytestmark = GPU`: marked `gpu` (selected with -m gpu) and skipped without CUDA.
GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]


def gpu_config(**overrides: object) -> ModelConfig:
    """4 layers, width 128, GQA 8/2 (head dim 16), vocab 256: big enough that a GPU kernel choice shows up in the
    numbers, small enough that a forward takes milliseconds."""
    base: dict[str, object] = dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
    )
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


@contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 matmuls in full fp32 on CUDA (no TF32), so CPU-vs-GPU differences are summation order only."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()
