"""Deterministic, sharded, resumable batches over an in-memory list of examples (or packed bins)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

from alignkit.errors import DataError

T = TypeVar("T")


class BatchIterator(Generic[T]):
    """Batches of `batch_size` items for one rank, epoch after epoch.

    Each epoch's order is a shuffle seeded by `seed + epoch` (the same on every rank and every run). After the
    shuffle the order is cut to a multiple of world_size (drop_last) or wrapped around to one (not drop_last), and
    rank r takes items[r::world_size], so every rank gets the same number of items, no item appears on two ranks,
    and together they cover the epoch. Batches are consecutive slices of the rank's items; with drop_last the
    final partial batch is skipped, so every batch has exactly batch_size items.

    `iter(it)` yields the rest of the current epoch, then moves to the next epoch; `forever()` keeps going.
    `state_dict()` records (epoch, position), where position counts batches already handed out this epoch, so a
    run restored with `load_state_dict` continues with exactly the batches the interrupted run had not yet used.
    Save the state after the optimizer step that consumed the last batch handed out.
    """

    def __init__(
        self,
        items: Sequence[T],
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside [0, world_size={world_size}).")
        self.items = items
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        if len(self) == 0:
            raise DataError(
                f"{len(items)} examples make no batch of {batch_size} per rank on {world_size} rank(s); use fewer "
                "ranks, a smaller batch size, or more data."
            )

    def _per_rank(self) -> int:
        n, w = len(self.items), self.world_size
        return n // w if self.drop_last else -(-n // w)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        per_rank = self._per_rank()
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """Indices of this rank's items for `epoch`, in order."""
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        total = self._per_rank() * self.world_size
        if total <= len(order):
            order = order[:total]
        else:  # pad by wrapping around, as torch's DistributedSampler does, so ranks stay in step
            order = (order * (total // len(order) + 1))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[T]]:
        indices = self.epoch_order(self.epoch)
        for b in range(self.position, len(self)):
            batch = [self.items[i] for i in indices[b * self.batch_size : (b + 1) * self.batch_size]]
            self.position = b + 1
            yield batch
        self.epoch += 1
        self.position = 0

    def forever(self) -> Iterator[list[T]]:
        while True:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.seed, "num_items": len(self.items),
            "batch_size": self.batch_size, "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_items", "batch_size", "world_size"):
            mine = len(self.items) if key == "num_items" else getattr(self, key)
            if key in state and state[key] != mine:
                raise DataError(
                    f"the saved data position was made with {key}={state[key]}, but this run has {key}={mine}; "
                    "resume with the same data and batch settings, or start a fresh run."
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def batch_iterator(
    items: Sequence[T],
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
) -> BatchIterator[T]:
    """A `BatchIterator` (see its docstring): deterministic per epoch, sharded by rank, resumable."""
    return BatchIterator(
        items, batch_size=batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
        drop_last=drop_last,
    )
