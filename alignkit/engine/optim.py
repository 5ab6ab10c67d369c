"""AdamW with weight decay on matrices only, and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from alignkit.engine.config import OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; biases, norm weights and embeddings do not.

    Decay pulls weights toward zero; for a bias or an RMSNorm gain (whose natural value is 1) that is a bias in
    the wrong direction, and for embeddings it shrinks the vectors of rare tokens, which get few gradient updates.
    `named_parameters` lists a tied weight once (under the embedding's name), so a tied LM head does not decay.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "norm" in name or "embed" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW; the fused kernel (one launch for all parameters, CPU and CUDA) where torch has it, else foreach."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("The model has no trainable parameters; check model and lora settings.")
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)  # type: ignore[arg-type]


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (1-based: the first update is step 1).

    Warmup: lr * step / warmup_steps for step <= warmup_steps. Then with progress p = (step - warmup) /
    (total - warmup) in (0, 1], which reaches 1 at the last step:
    cosine: min + (lr - min) * (1 + cos(pi p)) / 2; linear: min + (lr - min) * (1 - p); constant: lr.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    min_lr = lr * min_lr_ratio
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1.0 - progress)
    raise ValueError(f"unknown schedule {schedule!r}")


def lr_schedule(cfg: OptimSection, total_steps: int) -> Callable[[int], float]:
    """`step -> lr` for this config (1-based steps)."""
    return lambda step: lr_at(step, lr=cfg.lr, total_steps=total_steps, warmup_steps=cfg.warmup_steps,
                              schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
