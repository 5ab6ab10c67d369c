"""The engine's own config sections: how a model is optimised (`OptimSection`) and how a run is driven
(`TrainSection`). Trainers embed them in their stage configs; the engine imports nothing from the trainers.

Each field's doc is the comment directly above it; `alignkit train <stage> --help` prints them. Values are checked
when the config loads, so a bad rate or size fails before any model is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from alignkit.errors import ConfigError, check_at_least


@dataclass
class OptimSection:
    # Peak learning rate (AdamW).
    lr: float = 1e-5
    # Decoupled weight decay, applied to matrices only (not biases, norms or embeddings).
    weight_decay: float = 0.0
    # AdamW (beta1, beta2).
    betas: tuple[float, float] = (0.9, 0.999)
    # AdamW epsilon.
    eps: float = 1e-8
    # Steps of linear warmup from 0 to lr.
    warmup_steps: int = 0
    # Decay after warmup: cosine or linear down to min_lr_ratio * lr, or constant.
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # Final learning rate as a fraction of lr.
    min_lr_ratio: float = 0.0
    # Clip the global gradient norm to this value (0 or null disables clipping; the norm is logged either way).
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        checks = [
            (math.isfinite(self.lr) and self.lr >= 0, "lr", "a learning rate >= 0"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0"),
            (all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1), for example [0.9, 0.999]"),
            (self.eps > 0, "eps", "a number > 0"),
            (self.warmup_steps >= 0, "warmup_steps", "a whole number >= 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a fraction in [0, 1]"),
            (self.max_grad_norm is None or self.max_grad_norm >= 0, "max_grad_norm", "a norm > 0 (0 or null: off)"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ConfigError(f"optim.{name} must be {rule}; got {getattr(self, name)!r}.")


@dataclass
class TrainSection:
    # Sequences per optimizer step, summed over micro-batches and processes (the global batch).
    batch_size: int = 8
    # Sequences per forward/backward on each process; batch_size / (micro_batch_size * processes) accumulate.
    micro_batch_size: int = 8
    # Optimizer steps to run; when unset, `epochs` passes over the training data.
    max_steps: int | None = None
    # Passes over the training data (used when max_steps is unset).
    epochs: float = 1.0
    # fp32, or bf16 autocast with fp32 master weights.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Seed for initialisation, data order and dropout.
    seed: int = 0
    # Write a metrics.jsonl row every log_every steps.
    log_every: int = 1
    # Evaluate held-out loss every eval_every steps (0: only at the end).
    eval_every: int = 0
    # Also evaluate before the first step (logged as step 0), to see where training starts.
    eval_on_start: bool = False
    # Save a resumable checkpoint every save_every steps (0: only at the end).
    save_every: int = 0
    # Keep the newest keep_last checkpoints and delete older ones (0: keep all).
    keep_last: int = 2
    # Run directory: config.yaml, metrics.jsonl, tb/, checkpoints/, final/.
    output_dir: str = "runs/run"
    # Continue from the newest complete checkpoint in output_dir.
    resume: bool = False
    # Where to send metrics besides metrics.jsonl: tensorboard, wandb, trackio.
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = field(default_factory=lambda: ["tensorboard"])
    # Distributed wrapper under torchrun (one process ignores it): ddp (replicated weights) or fsdp2 (parameters,
    # gradients and AdamW state sharded per decoder layer). fsdp2 is unfinished: tested on CPUs (2 processes) and
    # one GPU, not yet on several GPUs or for speed and memory; layers are all-gathered in model.dtype (no
    # mixed-precision policy, no CPU offload); PPO with LoRA needs ppo.critic_init=reward_model under it.
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    # Device: auto (cuda when available), cpu or cuda.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Worker threads for CPU compute (0: torch's default).
    num_threads: int = 0
    # Peak FLOP/s of one device for the logged MFU; null: the datasheet figure of known GPUs, else a short matmul
    # probe in the run's precision (CPUs).
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("train.batch_size and train.micro_batch_size must be positive.")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.batch_size {self.batch_size} is not a multiple of train.micro_batch_size "
                f"{self.micro_batch_size}; the global batch is split into equal micro-batches."
            )
        check_at_least("train", self, 1, ("log_every",))
        check_at_least("train", self, 0, ("eval_every", "save_every", "keep_last", "num_threads"))
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be at least 1 (or null to use train.epochs); got {self.max_steps}.")
        if not self.epochs > 0:
            raise ConfigError(f"train.epochs must be > 0; got {self.epochs}.")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ConfigError(f"train.peak_flops must be > 0 (or null to measure it); got {self.peak_flops}.")


