"""A tiny model, in-code data and a causal-LM loss for engine tests (also used by the torchrun worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from alignkit.data import Batch, TokenizedExample, pad_collate
from alignkit.engine import DistInfo, Engine, Models, StepBatches, Trainable
from alignkit.engine.config import OptimSection, TrainSection
from alignkit.losses.lm import causal_lm_loss
from alignkit.model import LlamaForCausalLM, ModelConfig


def tiny_model(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    base: dict[str, Any] = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        max_position_embeddings=64,
    )
    base.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(ModelConfig(**base))
    model.init_weights()
    return model


def examples(n: int = 32, seed: int = 1) -> list[TokenizedExample]:
    """Sequences of different lengths with a 'prompt' that is not a target, so token counts vary per batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        # A learnable pattern: each token is the previous one plus 1 (mod 64).
        start = int(torch.randint(1, 64, (1,), generator=g))
        ids = [(start + i) % 63 + 1 for i in range(length)]
        out.append(TokenizedExample(ids, [False] * prompt + [True] * (length - prompt)))
    return out


def lm_loss(models: Models, batch: Batch, num_tokens: int) -> tuple[torch.Tensor, dict[str, Any]]:
    mask = batch.labels != -100
    logits = models["model"](batch.input_ids, attention_mask=batch.attention_mask, logits_mask=mask)
    loss, metrics = causal_lm_loss(logits, batch.labels[mask], num_tokens=num_tokens)
    return loss, {"token_accuracy": (logits.argmax(-1) == batch.labels[mask]).float().mean()}


def step_batches(items: list[TokenizedExample], cfg: TrainSection, *, info: DistInfo | None = None) -> StepBatches:
    info = info or DistInfo()
    return StepBatches(
        items, collate=lambda exs: pad_collate(exs, pad_id=0), batch_size=cfg.batch_size,
        micro_batch_size=cfg.micro_batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
    )


def run(run_dir: Path, *, total_steps: int = 6, model_seed: int = 0, loss_fn: Any = lm_loss,
        batches: Any = None, info: DistInfo | None = None, optim: OptimSection | None = None,
        **train: Any) -> tuple[Engine, list[dict]]:
    cfg = TrainSection(**{"batch_size": 8, "micro_batch_size": 8, "report_to": [], "peak_flops": 1e12, **train})
    optim = optim or OptimSection(lr=1e-2, warmup_steps=2, weight_decay=0.1, max_grad_norm=1.0)
    engine = Engine({"model": Trainable(tiny_model(model_seed), optim)}, cfg, run_dir=run_dir,
                    total_steps=total_steps, dist_info=info, stream=open("/dev/null", "w"))  # noqa: SIM115
    rows = engine.train(batches if batches is not None else step_batches(examples(), cfg, info=info), loss_fn)
    return engine, rows
