"""The stream of optimizer steps a trainer hands to the engine: for each step, this rank's micro-batches.

`StepBatches` fixes what one step contains from (seed, step) alone: epoch e shuffles the items with seed + e,
step s of the epoch takes the next `batch_size` of them, rank r takes its contiguous share and splits it into
micro-batches. So the global batch is the same whatever the number of processes or micro-batches (what makes
"1 process x 8 micro-batches == 2 processes x 4" exact), and resuming at step s needs nothing but s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch

from alignkit.errors import ConfigError, DataError

Item = TypeVar("Item")
MicroBatch = Any


class StepBatches(Generic[Item]):
    def __init__(
        self,
        items: Sequence[Item],
        *,
        collate: Callable[[list[Item]], MicroBatch],
        batch_size: int,
        micro_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        source: str = "",
    ) -> None:
        if batch_size % (micro_batch_size * world_size):
            raise ConfigError(
                f"train.batch_size {batch_size} must be a multiple of micro_batch_size x processes = "
                f"{micro_batch_size} x {world_size}; change one of them."
            )
        if len(items) < batch_size:
            raise DataError(
                f"{source + ': ' if source else ''}The training set has {len(items)} examples (after packing), "
                f"fewer than one global batch of {batch_size}; lower train.batch_size or add data."
            )
        self.items = items
        self.collate = collate
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        # Incomplete last batches are dropped so every step has the same number of sequences.
        self.steps_per_epoch = len(items) // batch_size
        self.step = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(len(self.items), generator=generator).tolist()
            else:
                self._order = list(range(len(self.items)))
            self._order_epoch = epoch
        return self._order

    def indices(self, step: int) -> list[list[int]]:
        """Item indices of this rank's micro-batches at (0-based) step `step`."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        batch = order[index * self.batch_size : (index + 1) * self.batch_size]
        per_rank = self.batch_size // self.world_size
        mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        return [mine[i : i + self.micro_batch_size] for i in range(0, per_rank, self.micro_batch_size)]

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        while True:
            micro = [self.collate([self.items[i] for i in idx]) for idx in self.indices(self.step)]
            self.step += 1
            yield micro

    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
