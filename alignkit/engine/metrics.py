"""How a metric is combined over the micro-batches of a step and over ranks, chosen per metric.

A loss function returns plain numbers or tensors for metrics that are means over the micro-batch: the engine
weights each by the micro-batch's count (its target tokens, pairs or episodes: whatever the step counts), so the
logged value is the mean over the whole global batch, as if it had been one micro-batch on one process. Anything
else says how it combines:

    {"kl": mean(kl_per_sample.mean(), weight=num_samples),   # weighted by samples, not by the step's count
     "clip_fraction": mean(frac, weight=1),                   # a plain mean over micro-batches
     "episodes": total(num_episodes),                         # summed over micro-batches and ranks
     "ratio_max": maximum(ratio.max()),                       # the largest over micro-batches and ranks
     "length_min": minimum(lengths.min())}

`reduce_metrics` does the same for numbers a trainer computes outside a step (rollout statistics on each rank).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from alignkit.engine import distributed as dist

Reduction = Literal["mean", "sum", "max", "min"]


@dataclass(frozen=True)
class Metric:
    """A value and how it combines: a weighted `mean` (weight None = the micro-batch's count), `sum`, `max`, `min`."""

    value: float | torch.Tensor
    reduce: Reduction = "mean"
    weight: float | torch.Tensor | None = None


def mean(value: float | torch.Tensor, weight: float | torch.Tensor | None = None) -> Metric:
    """Mean over micro-batches and ranks, each micro-batch weighted by `weight` (None: the step's count unit)."""
    return Metric(value, "mean", weight)


def total(value: float | torch.Tensor) -> Metric:
    """Summed over micro-batches and ranks."""
    return Metric(value, "sum")


def maximum(value: float | torch.Tensor) -> Metric:
    """The largest value over micro-batches and ranks."""
    return Metric(value, "max")


def minimum(value: float | torch.Tensor) -> Metric:
    """The smallest value over micro-batches and ranks."""
    return Metric(value, "min")


def _scalar(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    # float64 so sums over many micro-batches and ranks lose nothing (a Python float never passes through float32);
    # detached, never a .item() (no GPU sync).
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=device)


class MetricAccumulator:
    """Collects one step's metrics micro-batch by micro-batch; `result()` reduces them over ranks (collective)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._kinds: dict[str, Reduction] = {}
        self._values: dict[str, torch.Tensor] = {}  # mean: sum of weight * value; sum: sum; max / min: extreme
        self._weights: dict[str, torch.Tensor] = {}  # mean only: sum of weights

    def add(self, metrics: Mapping[str, Any], count: float) -> None:
        """One micro-batch's metrics; plain values are means weighted by `count`."""
        for key, raw in metrics.items():
            metric = raw if isinstance(raw, Metric) else Metric(raw)
            if self._kinds.setdefault(key, metric.reduce) != metric.reduce:
                raise ValueError(f"metric {key!r} is reduced by {self._kinds[key]} and {metric.reduce} in one step")
            value = _scalar(metric.value, self.device)
            if metric.reduce == "mean":
                weight = _scalar(count if metric.weight is None else metric.weight, self.device)
                value = value * weight
                self._weights[key] = self._weights[key] + weight if key in self._weights else weight
            if key not in self._values:
                self._values[key] = value
            elif metric.reduce in ("mean", "sum"):
                self._values[key] = self._values[key] + value
            elif metric.reduce == "max":
                self._values[key] = torch.maximum(self._values[key], value)
            else:
                self._values[key] = torch.minimum(self._values[key], value)

    def result(self, *, complete: bool = False) -> dict[str, float]:
        """Reduce over ranks and return plain floats. Every rank must hold the same metric names, or pass
        `complete=True` (one more collective) when a rank may have seen none of them (an evaluation shard that is
        empty on some rank): names it lacks then count as empty there."""
        if complete:
            for kinds in dist.all_gather_object(dict(self._kinds)):
                for key, kind in kinds.items():  # type: ignore[union-attr]
                    if key not in self._kinds:
                        self._add_empty(key, kind)
        keys = sorted(self._values)
        summed = [k for k in keys if self._kinds[k] in ("mean", "sum")]
        maxed = [k for k in keys if self._kinds[k] == "max"]
        mined = [k for k in keys if self._kinds[k] == "min"]
        means = [k for k in summed if self._kinds[k] == "mean"]
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        sums = torch.stack([self._values[k] for k in summed] + [self._weights[k] for k in means] + [zero])
        extremes = torch.stack([self._values[k] for k in maxed] + [-self._values[k] for k in mined] + [zero])
        dist.all_reduce(sums, "sum")
        dist.all_reduce(extremes, "max")
        out: dict[str, float] = {}
        sums_list, extremes_list = sums.tolist(), extremes.tolist()
        weights = dict(zip(means, sums_list[len(summed):]))
        for key, value in zip(summed, sums_list):
            out[key] = value / weights[key] if key in weights and weights[key] != 0 else value
        for key, value in zip(maxed, extremes_list):
            out[key] = value
        for key, value in zip(mined, extremes_list[len(maxed):]):
            out[key] = -value
        return out


    def _add_empty(self, key: str, kind: Reduction) -> None:
        """A metric this rank never saw: nothing to add to a sum or mean, no candidate for an extreme."""
        self._kinds[key] = kind
        empty = {"mean": 0.0, "sum": 0.0, "max": -math.inf, "min": math.inf}[kind]
        self._values[key] = torch.tensor(empty, dtype=torch.float64, device=self.device)
        if kind == "mean":
            self._weights[key] = torch.zeros((), dtype=torch.float64, device=self.device)


def reduce_metrics(metrics: Mapping[str, Any], device: torch.device | None = None) -> dict[str, float]:
    """Reduce a trainer's own metrics over ranks (collective); plain values are plain means over ranks."""
    accumulator = MetricAccumulator(device or torch.device("cpu"))
    accumulator.add(metrics, 1.0)
    return accumulator.result()
