"""The training engine every trainer shares: exact optimizer steps for named models; the trainer owns the loop.

    engine = Engine({"policy": Trainable(policy, cfg.optim)}, cfg.train, run_dir=..., total_steps=iterations,
                    frozen={"reference": Frozen(reference, source="runs/sft/final")})
    engine.start(data=prompts, trainer=trainer_state)         # resumes everything when train.resume is set
    for iteration in engine.iterations():
        with engine.generation_model("policy") as policy:    # rollouts with the live weights
            ...
        row = engine.step(micro_batches, loss_fn, models=["policy"])
        row |= engine.evaluate_if_due(eval_fn)
        engine.log(row)
        engine.save_if_due()
    rows = engine.finish()

`step` does one optimizer step for the models it names (all trainable ones by default) from a list of this rank's
micro-batches and a loss function

    loss_fn(models, micro_batch, count) -> (loss, metrics)

that reads the models it needs from `models` (a mapping by name) and returns `sum of per-unit losses / count`,
where `count` is the step's total of what `count_fn` counts (target tokens, pairs, episodes) over all micro-batches
and ranks, counted FIRST. So the micro-batch losses add up to exactly the mean over the whole step, and gradients
do not depend on how the global batch is split (1 x 8 == 8 x 1 == 2 ranks x 4). Metrics are combined per metric
(`alignkit.engine.metrics`). Each trainable model has its own AdamW, clipping and schedule, which counts that
model's own optimizer steps; the logged `step` is the trainer's iteration. Frozen models never enter an optimizer
or a checkpoint; their sources are recorded, and resuming with another source is an error.

`engine.train(batches, loss_fn)` is that loop with one `step` per iteration: what the supervised stages use.
Checkpoints hold every trainable model and optimizer, the state of every object given to `start` (a step source's
position, a trainer's KL controller or sampler state) and every RNG, so a resumed run computes exactly what the
uninterrupted run computed, sampling included, without replaying anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.engine import distributed as dist
from alignkit.engine.checkpoint import (
    capture_rng,
    decode_state,
    encode_state,
    latest_checkpoint,
    load_model_state,
    read_state,
    refuse_restart,
    remove_partial_checkpoints,
    restore_rng,
    save_checkpoint,
)
from alignkit.engine.config import OptimSection, TrainSection
from alignkit.engine.flops import FlopCounter, peak_flops
from alignkit.engine.logging import MetricsLogger
from alignkit.engine.metrics import MetricAccumulator, total
from alignkit.engine.optim import build_optimizer, lr_schedule
from alignkit.engine.precision import autocast
from alignkit.errors import CheckpointError, ConfigError, DataError, UserError

# Names the engine writes into every logged row itself.
RESERVED_KEYS = {"step", "loss", "lr", "grad_norm", "elapsed_s", "tflops", "mfu"}


class NonFiniteLossError(UserError):
    """The loss or gradient norm became inf/NaN; the step was not applied and no checkpoint was written."""


@dataclass
class Trainable:
    """A model the engine optimises, with its own optimizer settings."""

    module: nn.Module
    optim: OptimSection
    # Optimizer steps the learning-rate schedule spans (warmup and decay); None: the engine's total_steps, one
    # optimizer step per iteration. PPO's policy takes epochs x minibatches steps per iteration.
    total_steps: int | None = None


@dataclass
class Frozen:
    """A model the engine never optimises or checkpoints (a reference, a reward model), and where it came from."""

    module: nn.Module
    source: str


class Models(Mapping[str, nn.Module]):
    """The models a loss or evaluation function reads by name.

    The models a step updates are their training wrappers (DDP / FSDP2: call them for the forward whose gradient
    counts); the other trainable models and the frozen ones are the plain modules.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self._modules = modules

    def __getitem__(self, name: str) -> nn.Module:
        if name not in self._modules:
            raise ConfigError(
                f"The loss or evaluation function asks for model {name!r}, but the engine holds "
                f"{', '.join(repr(n) for n in self._modules)}; pass it to Engine(...) as a trainable or frozen model."
            )
        return self._modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


LossFn = Callable[[Models, Any, int], tuple[torch.Tensor, dict[str, Any]]]
EvalFn = Callable[[Models], dict[str, float]]


def count_tokens(micro_batch: Any) -> int:
    """Target tokens of a micro-batch (`Batch.num_tokens`): the count of the language-model stages."""
    return int(micro_batch.num_tokens)


class Engine:
    def __init__(
        self,
        models: Mapping[str, Trainable],
        cfg: TrainSection,
        *,
        run_dir: str | Path,
        total_steps: int,
        frozen: Mapping[str, Frozen] | None = None,
        dist_info: dist.DistInfo | None = None,
        count_fn: Callable[[Any], int] = count_tokens,
        count_unit: str = "tokens",
        config_dict: dict[str, Any] | None = None,
        stream: Any = None,
    ) -> None:
        if total_steps < 1:
            raise ConfigError(f"The run has {total_steps} optimizer steps; set train.max_steps or train.epochs higher.")
        if not models:
            raise ConfigError("The engine needs at least one trainable model.")
        frozen = dict(frozen or {})
        both = sorted(set(models) & set(frozen))
        if both:
            raise ConfigError(f"Model {both[0]!r} is given as both trainable and frozen; give it once.")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        first = next(iter(models.values())).module
        self.dist = dist_info or dist.DistInfo(device=next(first.parameters()).device)
        self.count_fn = count_fn
        # What count_fn counts names the logged count and rate: num_tokens / tokens_per_s, num_pairs / pairs_per_s.
        self.count_unit = count_unit
        self.trainables = dict(models)
        self.frozen = frozen
        _check_parameters(self.trainables, self.frozen)
        for item in self.frozen.values():
            item.module.eval().requires_grad_(False)
        # Loaded models come in eval mode; training mode is what turns on activation checkpointing and dropout
        # (LoRA's), from the first step, not only after the first evaluation put the models back in it.
        for item in models.values():
            item.module.train()
        self.modules = {name: item.module for name, item in self.trainables.items()}
        self.wrapped = {name: dist.wrap_model(item.module, cfg.strategy, self.dist) for name, item in models.items()}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedules: dict[str, Callable[[int], float]] = {}
        for name, item in self.trainables.items():
            try:
                self.optimizers[name] = build_optimizer(item.module, item.optim)
            except ValueError as e:
                raise ConfigError(f"Model {name!r}: {e}") from None
            self.schedules[name] = lr_schedule(item.optim, item.total_steps or total_steps)
        self.optimizer_steps = dict.fromkeys(self.trainables, 0)
        self.iteration = 0
        self.elapsed = 0.0
        self.last_checkpoint: Path | None = None
        self.rows: list[dict[str, Any]] = []
        self._config_dict = config_dict
        self._stream = stream
        self._stateful: dict[str, Any] = {}
        self._logger: MetricsLogger | None = None
        self._window_count = 0
        self._window_start = time.perf_counter()
        self._iteration_start = time.perf_counter()
        self._evaluated_at = -1
        self.flops = FlopCounter()
        self.flops.watch([*self.modules.values(), *(item.module for item in self.frozen.values())])
        self.peak_flops = cfg.peak_flops or peak_flops(self.dist.device, cfg.precision)
        if not cfg.resume:
            refuse_restart(self.run_dir)

    # ------------------------------------------------------------------------------------------ the loop

    def train(self, batches: Iterable[list[Any]], loss_fn: LossFn, *, eval_fn: EvalFn | None = None,
              state: Mapping[str, Any] | None = None,
              on_step: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """One optimizer step per iteration over `batches` until total_steps: the supervised stages' loop.

        `batches` must be resumable (`state_dict` / `load_state_dict`, like `StepBatches`); `state` adds other
        objects to checkpoint; `on_step(row)` sees every step's reduced metrics row (with its `step`), logged or not.
        Returns the metrics rows (all of metrics.jsonl on rank 0).
        """
        self.start(data=batches, **(state or {}))
        stream = iter(batches)
        self.log(self.evaluate_if_due(eval_fn))
        for iteration in self.iterations():
            row = self.step(next(stream), loss_fn)
            if on_step is not None:
                on_step({"step": iteration, **row})
            row.update(self.evaluate_if_due(eval_fn))
            self.log(row)
            self.save_if_due()
        return self.finish()

    def start(self, **stateful: Any) -> int:
        """Register the objects every checkpoint holds (by name) and, with train.resume, restore the newest
        checkpoint: models, optimizers, these objects, RNGs. Returns the iteration the run continues after."""
        for name, obj in stateful.items():
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise ConfigError(
                    f"{name!r} ({type(obj).__name__}) has no state_dict / load_state_dict, so a checkpoint could not "
                    "resume it exactly; give it both (StepBatches has them), or keep its state elsewhere."
                )
        self._stateful = dict(stateful)
        self._logger = MetricsLogger(
            self.run_dir, total_steps=self.total_steps, report_to=self.cfg.report_to, enabled=self.dist.is_main,
            config=self._config_dict, stream=self._stream, resume=self.cfg.resume,
        )
        if self.cfg.resume:
            self._resume()
        self._logger.start_step = self.iteration
        self._window_start = time.perf_counter()
        self.flops.take()  # setup forwards (a reference precompute) are not part of the first window
        return self.iteration

    def iterations(self) -> Iterator[int]:
        """The iterations left, 1-based; `engine.iteration` is the current one. Times each one."""
        while self.iteration < self.total_steps:
            self._iteration_start = time.perf_counter()
            self.iteration += 1
            yield self.iteration
            self.elapsed += time.perf_counter() - self._iteration_start

    def finish(self) -> list[dict[str, Any]]:
        """Close the logger and the FLOP counter; return the metrics rows (all of metrics.jsonl on rank 0)."""
        if self._logger is not None:
            self._logger.close()
        self.flops.close()
        if self.dist.is_main and self._logger is not None and self._logger.path.exists():
            return [json.loads(line) for line in self._logger.path.read_text().splitlines() if line.strip()]
        return self.rows

    # ------------------------------------------------------------------------------------------ one step

    def step(self, micro_batches: Sequence[Any], loss_fn: LossFn, *, models: Sequence[str] | None = None,
             count_fn: Callable[[Any], int] | None = None) -> dict[str, Any]:
        """One exact optimizer step of `models` (default: every trainable model) over this rank's micro-batches.

        Other trainable models are not updated: gradients that reach them are dropped. Returns the metrics row:
        loss, lr and grad_norm (suffixed `/<model>` when the engine holds several trainable models), the step's
        count, and the loss function's metrics reduced over micro-batches and ranks.
        """
        names = list(models) if models is not None else list(self.trainables)
        unknown = [n for n in names if n not in self.trainables]
        if unknown or not names:
            raise ConfigError(
                f"engine.step(models={names}) names {unknown or 'no model'}; the trainable models are "
                f"{', '.join(repr(n) for n in self.trainables)}."
            )
        count_fn = count_fn or self.count_fn
        count_key = f"num_{self.count_unit}"
        device = self.dist.device
        counts = [count_fn(mb) for mb in micro_batches]
        # The global count first: every micro-batch's loss is divided by the same number.
        global_count = int(dist.all_reduce_sum(torch.tensor(float(sum(counts)), dtype=torch.float64)).item())
        if global_count == 0:
            raise DataError(
                f"Step {self.iteration} has nothing to train on in any of its micro-batches (0 {self.count_unit}: "
                "every label is masked); check the data's loss masks or the truncation settings."
            )
        view = Models({**{n: self.wrapped[n] if n in names else m for n, m in self.modules.items()},
                       **{n: item.module for n, item in self.frozen.items()}})
        # DDP / FSDP2 average gradients over ranks; the losses are already divided by the global count, so undo it.
        scale = float(self.dist.world_size)
        metrics = MetricAccumulator(device)
        for index, micro_batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with contextlib.ExitStack() as stack:
                if self.dist.enabled and not last:
                    for name in names:
                        if hasattr(self.wrapped[name], "no_sync"):
                            stack.enter_context(self.wrapped[name].no_sync())
                with autocast(self.cfg.precision, device):
                    loss, step_metrics = loss_fn(view, micro_batch, global_count)
                (loss * scale).backward()
            metrics.add({k: v for k, v in step_metrics.items() if k not in RESERVED_KEYS and k != count_key},
                        counts[index])
            metrics.add({"loss": total(loss.detach().float())}, counts[index])
        for name in self.trainables:
            if name not in names:
                self.optimizers[name].zero_grad(set_to_none=True)
        reduced = metrics.result()
        norms = {}
        for name in names:
            params = [p for p in self.modules[name].parameters() if p.requires_grad]
            max_norm = self.trainables[name].optim.max_grad_norm or math.inf
            norms[name] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        loss_value = reduced.pop("loss")
        bad = [n for n, v in norms.items() if not math.isfinite(v)]
        if not math.isfinite(loss_value) or bad:
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was saved yet"
            norm_text = ", ".join(f"{n} {v}" for n, v in norms.items())
            raise NonFiniteLossError(
                f"Step {self.iteration}: the loss is {loss_value} and the gradient norm ({norm_text}) is not finite; "
                f"training stopped before applying this update ({where}). Lower optim.lr, set optim.max_grad_norm, "
                "or use train.precision=fp32, then resume with --resume."
            )
        row: dict[str, Any] = {"loss": loss_value}
        single = len(self.trainables) == 1
        for name in names:
            self.optimizer_steps[name] += 1
            lr = self.schedules[name](self.optimizer_steps[name])
            for group in self.optimizers[name].param_groups:
                group["lr"] = lr
            self.optimizers[name].step()
            self.optimizers[name].zero_grad(set_to_none=True)
            row["lr" if single else f"lr/{name}"] = lr
            row["grad_norm" if single else f"grad_norm/{name}"] = norms[name]
        row[count_key] = global_count
        row.update(reduced)
        self._window_count += global_count
        return row

    # ------------------------------------------------------------------------------------------ evaluate, log, save

    def evaluate(self, eval_fn: EvalFn) -> dict[str, float]:
        """Run `eval_fn(models)` in eval mode without gradients (collective when it reduces over ranks)."""
        for module in self.wrapped.values():
            module.eval()
        try:
            with torch.no_grad(), autocast(self.cfg.precision, self.dist.device):
                return dict(eval_fn(Models({**self.wrapped, **{n: f.module for n, f in self.frozen.items()}})))
        finally:
            for module in self.wrapped.values():
                module.train()

    def evaluate_if_due(self, eval_fn: EvalFn | None) -> dict[str, float]:
        """Evaluate at the last iteration, every train.eval_every, and before the first (train.eval_on_start)."""
        if eval_fn is None:
            return {}
        it = self.iteration
        due = (it == 0 and self.cfg.eval_on_start) or it == self.total_steps or (
            it > 0 and self.cfg.eval_every > 0 and it % self.cfg.eval_every == 0)
        if not due:
            return {}
        self._evaluated_at = it
        return self.evaluate(eval_fn)

    def log(self, row: Mapping[str, Any]) -> dict[str, Any] | None:
        """Write this iteration's row when due (every train.log_every, after an evaluation, at the end), adding the
        step, the count's rate, elapsed time, model TFLOP/s per device and MFU. Collective; returns what it wrote."""
        it = self.iteration
        if not row:
            return None
        if it == 0:  # the evaluation before training
            out = {"step": 0, **row}
        else:
            if not (it == self.total_steps or it % self.cfg.log_every == 0 or self._evaluated_at == it):
                return None
            now = time.perf_counter()
            seconds = max(now - self._window_start, 1e-9)
            flops = float(dist.all_reduce_sum(torch.tensor(self.flops.take(), dtype=torch.float64)))
            out = {"step": it, **row}
            out[f"{self.count_unit}_per_s"] = self._window_count / seconds
            out["elapsed_s"] = self.elapsed + (now - self._iteration_start)
            out["tflops"] = flops / seconds / self.dist.world_size / 1e12
            out["mfu"] = 100.0 * flops / (seconds * self.peak_flops * self.dist.world_size)
            self._window_count, self._window_start = 0, now
        self.rows.append(out)
        assert self._logger is not None, "call engine.start() before logging"
        self._logger.log(out)
        return out

    def message(self, text: str) -> None:
        """A line in the run's progress output (rank 0)."""
        if self._logger is not None:
            self._logger.message(text)

    def save_if_due(self) -> Path | None:
        """Checkpoint every train.save_every iterations and at the last one (collective)."""
        it = self.iteration
        if it == self.total_steps or (self.cfg.save_every > 0 and it % self.cfg.save_every == 0):
            return self.save()
        return None

    def save(self) -> Path:
        """Write a checkpoint of the current iteration (collective: every rank must call it)."""
        gathered = dist.all_gather_object({
            "rng": capture_rng(),
            "stateful": {name: encode_state(obj.state_dict()) for name, obj in self._stateful.items()},
        })
        state = {
            "elapsed_s": self.elapsed + (time.perf_counter() - self._iteration_start),
            "total_steps": self.total_steps,
            "world_size": self.dist.world_size,
            "optimizer_steps": self.optimizer_steps,
            "models": {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in self.modules.items()},
            "frozen": {name: item.source for name, item in self.frozen.items()},
            "stateful": [g["stateful"] for g in gathered],  # type: ignore[index]
            "rng": [g["rng"] for g in gathered],  # type: ignore[index]
        }
        path = save_checkpoint(self.run_dir, self.iteration, models={n: dist.unwrap(w) for n, w in self.wrapped.items()},
                               optimizers=self.optimizers, state=state, keep_last=self.cfg.keep_last,
                               is_main=self.dist.is_main)
        self.last_checkpoint = path
        return path

    # ------------------------------------------------------------------------------------------ generation

    @contextlib.contextmanager
    def generation_model(self, name: str) -> Iterator[nn.Module]:
        """Model `name` as `alignkit.generation.generate` wants it: the plain module (not its DDP wrapper), with
        full parameters under FSDP2, in eval mode; training mode (and sharding) come back when the block ends.
        The weights are the live ones: no copy is made."""
        module = Models({**self.modules, **{n: f.module for n, f in self.frozen.items()}})[name]
        was_training = module.training
        with dist.full_parameters(module):
            module.eval()
            try:
                yield module
            finally:
                module.train(was_training)

    # ------------------------------------------------------------------------------------------ resume

    def _resume(self) -> None:
        assert self._logger is not None
        if self.dist.is_main:
            remove_partial_checkpoints(self.run_dir)
        dist.barrier()
        path = latest_checkpoint(self.run_dir)
        if path is None:
            self._logger.message(f"No complete checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0.")
            return
        state = read_state(path)
        self._check_resumable(path, state)
        for name in self.trainables:
            saved_steps = int(state["optimizer_steps"][name])
            load_model_state(path, name, model=dist.unwrap(self.wrapped[name]),
                             optimizer=self.optimizers[name] if saved_steps else None, device=self.dist.device)
        self.iteration = int(state["step"])
        self.optimizer_steps = {name: int(state["optimizer_steps"][name]) for name in self.trainables}
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.last_checkpoint = path
        rank = self.dist.rank
        restore_rng(state["rng"][rank % len(state["rng"])])
        saved = state["stateful"][rank % len(state["stateful"])]
        for name, obj in self._stateful.items():
            obj.load_state_dict(decode_state(saved[name]))
        if self.dist.is_main:
            self._logger.truncate_after(self.iteration)
        self._logger.message(f"Resumed from {path} at step {self.iteration}.")

    def _check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        """The checkpoint holds the same trainable models, frozen sources and stateful objects as this run."""
        saved_models = state.get("models", {})
        if sorted(saved_models) != sorted(self.trainables):
            raise CheckpointError(
                f"Checkpoint {path} holds the trainable models {sorted(saved_models)}, this run trains "
                f"{sorted(self.trainables)}; resume with the same stage and models, or choose another train.output_dir."
            )
        for name, source in state.get("frozen", {}).items():
            if name in self.frozen and self.frozen[name].source != source:
                raise CheckpointError(
                    f"Checkpoint {path} was trained against frozen model {name!r} from {source!r}, this run loads it "
                    f"from {self.frozen[name].source!r}; resume with the same {name} model."
                )
        if sorted(state.get("frozen", {})) != sorted(self.frozen):
            raise CheckpointError(
                f"Checkpoint {path} was trained with the frozen models {sorted(state.get('frozen', {}))}, this run has "
                f"{sorted(self.frozen)}; resume with the same models."
            )
        saved = state["stateful"][0] if state.get("stateful") else {}
        if sorted(saved) != sorted(self._stateful):
            raise CheckpointError(
                f"Checkpoint {path} holds the state of {sorted(saved)}, this run resumes {sorted(self._stateful)}; "
                "resume with the same trainer."
            )


def _check_parameters(trainables: Mapping[str, Trainable], frozen: Mapping[str, Frozen]) -> None:
    """No parameter trains in two optimizers, and no frozen model holds a parameter that trains."""
    owner: dict[int, tuple[str, str]] = {}
    for name, item in trainables.items():
        for param_name, param in item.module.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in owner and owner[id(param)][0] != name:
                other, other_param = owner[id(param)]
                raise ConfigError(
                    f"Models {other!r} and {name!r} share the trainable parameter {other_param} ({param_name}); it "
                    "would be updated by two optimizers. Freeze it in one of them, or give each model its own copy."
                )
            owner[id(param)] = (name, param_name)
    for name, item in frozen.items():
        for param_name, param in item.module.named_parameters():
            if id(param) in owner:
                trainer, _ = owner[id(param)]
                raise ConfigError(
                    f"Frozen model {name!r} holds {param_name}, which trainable model {trainer!r} trains; a frozen "
                    "model must not share trainable weights (for a LoRA reference, disable the policy's adapters "
                    "instead: alignkit.model.lora.disable_adapters)."
                )
