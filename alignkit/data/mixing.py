"""Several training sources mixed by weight: domain data with general replay, say.

The mixture is built once, when the data loads, as one list of examples that the engine then batches like any
other training set; so it is fixed by a seed, and a resumed run (which replays the same batch order) sees exactly
the examples the uninterrupted run would have.

With weights w_0..w_k (normalised to sum 1), the mixture holds every example of the first source once and
round(n_0 * w_i / w_0) examples of each other source i: one epoch of the first source with the others in
proportion. A source contributes its examples in a seeded random order, cycling through further orders when it is
asked for more than it holds, so no example repeats before all of its source has been used. The engine shuffles
the whole mixture at every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch

from alignkit.errors import ConfigError

T = TypeVar("T")

__all__ = ["mixture_counts", "mix_sources", "normalise_weights"]


def normalise_weights(weights: Sequence[float] | None, num_sources: int, *, key: str = "data.weights") -> list[float]:
    """Weights summing to 1 (equal when None); a ConfigError for a wrong count, a negative or non-finite weight,
    or a zero sum."""
    if weights is None:
        return [1.0 / num_sources] * num_sources
    if len(weights) != num_sources:
        raise ConfigError(f"{key} has {len(weights)} weights for {num_sources} sources in data.train; give one "
                          "weight per source.")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"{key} must be finite and non-negative; got {list(weights)}.")
    total = sum(weights)
    if not total > 0:
        raise ConfigError(f"{key} must sum to a positive number; got {list(weights)}.")
    if weights[0] == 0:
        raise ConfigError(f"{key}: the first source sets the size of the mixture (one pass over it), so its weight "
                          f"must be positive; got {list(weights)}. Put the source you train for first.")
    return [w / total for w in weights]


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Examples taken from each source: all of the first, the others in proportion to their weights."""
    first = sizes[0]
    return [first] + [round(first * w / weights[0]) for w in weights[1:]]


def mix_sources(sources: Sequence[Sequence[T]], weights: Sequence[float] | None, *, seed: int,
                names: Sequence[str] | None = None) -> tuple[list[T], list[int]]:
    """(the mixture, the examples taken from each source). `sources[0]` is used once; see the module docstring."""
    names = list(names) if names is not None else [f"source {i}" for i in range(len(sources))]
    for name, source in zip(names, sources):
        if not source:
            raise ConfigError(f"data.train: {name} has no examples to mix; remove it or check its records.")
    normalised = normalise_weights(weights, len(sources))
    counts = mixture_counts([len(s) for s in sources], normalised)
    mixture: list[T] = []
    for index, (source, count) in enumerate(zip(sources, counts)):
        # One generator per source: adding a source leaves what the others contribute unchanged.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        taken = 0
        while taken < count:
            order = torch.randperm(len(source), generator=generator).tolist()
            for i in order[: count - taken]:
                mixture.append(source[i])
            taken += min(len(order), count - taken)
    return mixture, counts
