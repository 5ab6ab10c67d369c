"""The training engine every trainer shares: one optimizer step at a time, exact under accumulation and DDP.

A trainer supplies the model, a stream of steps (each a list of this rank's micro-batches) and a loss function

    loss_fn(model, micro_batch, num_tokens_global) -> (loss, metrics)

that returns `sum of per-token losses / num_tokens_global`. The engine counts the step's target tokens over all
micro-batches and ranks FIRST, so the sum of the micro-batch losses is exactly the mean over the whole step, and
gradients do not depend on how the global batch is split (1 x 8 == 8 x 1 == 2 ranks x 4). It then does the
backward passes (without DDP's all-reduce on all but the last), gradient clipping, the learning-rate schedule and
the optimizer step, and writes metrics, evaluations and checkpoints. `resume=True` restarts from the newest
complete checkpoint so every later step computes exactly what the uninterrupted run computed.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from alignkit.engine import distributed as dist
from alignkit.engine.checkpoint import (
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    restore_rng,
    save_checkpoint,
)
from alignkit.engine.logging import MetricsLogger
from alignkit.engine.optim import build_optimizer, lr_schedule
from alignkit.engine.precision import autocast
from alignkit.errors import ConfigError, DataError, UserError

if TYPE_CHECKING:
    from alignkit.trainers.configs import OptimSection, TrainSection

LossFn = Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict[str, Any]]]
EvalFn = Callable[[nn.Module], dict[str, float]]

# Metrics the engine computes itself; a loss_fn's own values under these names are ignored.
_ENGINE_KEYS = {"step", "loss", "lr", "grad_norm", "num_tokens", "tokens_per_s", "num_pairs", "pairs_per_s",
                "elapsed_s", "epoch"}


class NonFiniteLossError(UserError):
    """The loss or gradient norm became inf/NaN; the step was not applied and no checkpoint was written."""


def default_num_tokens(micro_batch: Any) -> int:
    """Target tokens of a micro-batch (`Batch.num_tokens`); preference trainers count pairs instead."""
    return int(micro_batch.num_tokens)


class Engine:
    def __init__(
        self,
        model: nn.Module,
        cfg: TrainSection,
        optim: OptimSection,
        *,
        run_dir: str | Path,
        total_steps: int,
        dist_info: dist.DistInfo | None = None,
        num_tokens_fn: Callable[[Any], int] = default_num_tokens,
        count_unit: str = "tokens",
        config_dict: dict[str, Any] | None = None,
        stream: Any = None,
    ) -> None:
        if total_steps < 1:
            raise ConfigError(f"The run has {total_steps} optimizer steps; set train.max_steps or train.epochs higher.")
        self.cfg = cfg
        self.optim_cfg = optim
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.dist = dist_info or dist.DistInfo(device=next(model.parameters()).device)
        self.num_tokens_fn = num_tokens_fn
        # What num_tokens_fn counts names the logged count and rate: num_tokens / tokens_per_s, or num_pairs /
        # pairs_per_s for preference stages.
        self._count_key, self._rate_key = f"num_{count_unit}", f"{count_unit}_per_s"
        self.model = model
        self.wrapped = dist.wrap_model(model, cfg.strategy, self.dist)
        self.optimizer = build_optimizer(model, optim)
        self.lr_fn = lr_schedule(optim, total_steps)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step = 0
        self.elapsed = 0.0
        self.rows: list[dict[str, Any]] = []
        self._config_dict = config_dict
        self._stream = stream
        self.last_checkpoint: Path | None = None
        self._batches_for_state: Any = None
        if not cfg.resume and list_checkpoints(self.run_dir):
            raise ConfigError(
                f"{self.run_dir} already holds checkpoints from an earlier run; pass --resume (train.resume=true) "
                "to continue it, or choose another train.output_dir."
            )

    # ------------------------------------------------------------------------------------------ public

    def train(self, batches: Iterable[list[Any]], loss_fn: LossFn, *, eval_fn: EvalFn | None = None) -> list[dict]:
        """Run optimizer steps until `total_steps`; return the metrics rows (all of metrics.jsonl on rank 0)."""
        logger = MetricsLogger(
            self.run_dir, total_steps=self.total_steps, report_to=self.cfg.report_to, enabled=self.dist.is_main,
            config=self._config_dict, stream=self._stream, resume=self.cfg.resume,
        )
        try:
            self._batches_for_state = batches
            skip = self._maybe_resume(batches, logger)
            iterator = iter(batches)
            for _ in range(skip):  # a plain iterable without state_dict: replay it up to the checkpoint
                next(iterator)
            self._loop(iterator, loss_fn, eval_fn, logger)
        finally:
            logger.close()
        if self.dist.is_main and logger.path.exists():
            return [json.loads(line) for line in logger.path.read_text().splitlines() if line.strip()]
        return self.rows

    def save(self, batches: Any = None) -> Path | None:
        """Write a checkpoint of the current step (collective: every rank must call it)."""
        rng = dist.all_gather_object(capture_rng())
        if not self.dist.is_main:
            dist.barrier()
            return None
        data_state = batches.state_dict() if hasattr(batches, "state_dict") else {"step": self.step}
        state = {"elapsed_s": self.elapsed, "total_steps": self.total_steps, "data": data_state, "rng": rng,
                 "world_size": self.dist.world_size}
        path = save_checkpoint(self.run_dir, self.step, model=dist.unwrap(self.wrapped), optimizer=self.optimizer,
                               state=state, keep_last=self.cfg.keep_last)
        self.last_checkpoint = path
        dist.barrier()
        return path

    # ------------------------------------------------------------------------------------------ internals

    def _maybe_resume(self, batches: Any, logger: MetricsLogger) -> int:
        if not self.cfg.resume:
            return 0
        if self.dist.is_main:
            remove_partial_checkpoints(self.run_dir)
        dist.barrier()
        path = latest_checkpoint(self.run_dir)
        if path is None:
            logger.message(f"No complete checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0.")
            return 0
        state = load_checkpoint(path, model=dist.unwrap(self.wrapped), optimizer=self.optimizer,
                                device=self.dist.device)
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.last_checkpoint = path
        if self.dist.is_main:
            logger.truncate_after(self.step)
        logger.message(f"Resumed from {path} at step {self.step}.")
        rng_states = state["rng"]
        restore_rng(rng_states[self.dist.rank % len(rng_states)])
        if hasattr(batches, "load_state_dict"):
            batches.load_state_dict(state["data"])
            return 0
        return self.step

    def _loop(self, iterator: Any, loss_fn: LossFn, eval_fn: EvalFn | None, logger: MetricsLogger) -> None:
        if eval_fn is not None and self.step == 0 and getattr(self.cfg, "eval_on_start", False):
            row = {"step": 0, **self._evaluate(eval_fn)}
            self.rows.append(row)
            logger.log(row)
        self.wrapped.train()
        window_tokens = 0
        window_start = time.perf_counter()
        while self.step < self.total_steps:
            step_start = time.perf_counter()
            try:
                micro_batches = next(iterator)
            except StopIteration:
                break
            row = self._train_step(micro_batches, loss_fn)
            window_tokens += row[self._count_key]
            is_last = self.step == self.total_steps
            do_eval = eval_fn is not None and (
                is_last or (self.cfg.eval_every > 0 and self.step % self.cfg.eval_every == 0)
            )
            self.elapsed += time.perf_counter() - step_start
            if do_eval:
                eval_start = time.perf_counter()
                row.update(self._evaluate(eval_fn))  # type: ignore[arg-type]
                self.elapsed += time.perf_counter() - eval_start
            if do_eval or is_last or self.step % self.cfg.log_every == 0:
                now = time.perf_counter()
                row[self._rate_key] = window_tokens / max(now - window_start, 1e-9)
                row["elapsed_s"] = self.elapsed
                window_tokens, window_start = 0, now
                self.rows.append(row)
                logger.log(row)
            if is_last or (self.cfg.save_every > 0 and self.step % self.cfg.save_every == 0):
                self.save(self._batches_for_state)

    def _train_step(self, micro_batches: list[Any], loss_fn: LossFn) -> dict[str, Any]:
        device = self.dist.device
        counts = [self.num_tokens_fn(mb) for mb in micro_batches]
        # The global count first: every micro-batch's loss is divided by the same number.
        global_tokens = int(dist.all_reduce_sum(torch.tensor(float(sum(counts)), dtype=torch.float64)).item())
        if global_tokens == 0:
            raise DataError(
                f"Step {self.step + 1} has no target tokens in any of its micro-batches (every label is masked); "
                "check the data's loss masks or the truncation settings."
            )
        # DDP averages gradients over ranks; the losses are already divided by the global count, so undo it.
        scale = float(self.dist.world_size)
        total_loss = torch.zeros((), dtype=torch.float32, device=device)
        metric_sums: dict[str, torch.Tensor] = {}
        for index, micro_batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext()
            if self.dist.enabled and not last and hasattr(self.wrapped, "no_sync"):
                sync = self.wrapped.no_sync()  # type: ignore[assignment]
            with sync:
                with autocast(self.cfg.precision, device):
                    loss, metrics = loss_fn(self.wrapped, micro_batch, global_tokens)
                (loss * scale).backward()
            total_loss += loss.detach().float()
            for key, value in metrics.items():
                if key in _ENGINE_KEYS:
                    continue
                # loss_fn metrics are per-micro-batch means; weight them by the micro-batch's token count.
                weighted = torch.as_tensor(value, dtype=torch.float32, device=device).detach() * counts[index]
                metric_sums[key] = metric_sums.get(key, torch.zeros((), device=device)) + weighted
        keys = sorted(metric_sums)
        reduced = dist.all_reduce_sum(torch.stack([total_loss] + [metric_sums[k] for k in keys]))
        max_norm = self.optim_cfg.max_grad_norm or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        loss_value = float(reduced[0])
        step = self.step + 1
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was saved yet"
            raise NonFiniteLossError(
                f"Step {step}: the loss is {loss_value} and the gradient norm {grad_norm}; training stopped "
                f"before applying this update ({where}). Lower optim.lr, set optim.max_grad_norm, or use "
                "train.precision=fp32, then resume with --resume."
            )
        lr = self.lr_fn(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        row: dict[str, Any] = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                               self._count_key: global_tokens}
        for i, key in enumerate(keys):
            row[key] = float(reduced[i + 1]) / global_tokens
        return row

    def _evaluate(self, eval_fn: EvalFn) -> dict[str, float]:
        self.wrapped.eval()
        try:
            with torch.no_grad(), autocast(self.cfg.precision, self.dist.device):
                return dict(eval_fn(self.wrapped))
        finally:
            self.wrapped.train()
