"""StepBatches: what step s holds depends on (seed, s) only, so ranks and micro-batch splits see one global batch,
and a resumed stream continues with exactly the batches the interrupted one had not used."""

from __future__ import annotations

import pytest

from alignkit.engine import StepBatches
from alignkit.errors import ConfigError, DataError


def stream(world_size: int = 1, rank: int = 0, micro: int = 2, seed: int = 3) -> StepBatches:
    return StepBatches(list(range(20)), collate=list, batch_size=8, micro_batch_size=micro, seed=seed, rank=rank,
                       world_size=world_size)


def global_batches(world_size: int, micro: int, steps: int = 5) -> list[list[int]]:
    ranks = [iter(stream(world_size, r, micro)) for r in range(world_size)]
    out = []
    for _ in range(steps):
        out.append([x for it in ranks for mb in next(it) for x in mb])
    return out


def test_global_batch_is_the_same_for_any_split() -> None:
    reference = global_batches(1, 8)
    assert global_batches(1, 2) == reference and global_batches(2, 4) == reference and global_batches(4, 1) == reference
    # Each epoch (2 steps of 8 from 20 items; the last 4 dropped) is a fresh seeded shuffle without repeats.
    assert len(set(reference[0] + reference[1])) == 16
    assert reference[:2] != reference[2:4]
    assert global_batches(1, 8) == reference  # deterministic
    other = [[x for mb in b for x in mb] for _, b in zip(range(2), stream(seed=4))]
    assert other != reference[:2]


def test_resume_continues_with_the_unused_batches() -> None:
    first = stream()
    it = iter(first)
    seen = [next(it) for _ in range(3)]
    resumed = stream()
    resumed.load_state_dict(first.state_dict())
    assert next(iter(resumed)) == next(it)
    assert len(seen) == 3 and first.state_dict() == {"step": 4}


def test_bad_sizes_are_explained() -> None:
    with pytest.raises(ConfigError, match="multiple of micro_batch_size x processes"):
        stream(world_size=3)
    with pytest.raises(DataError, match="fewer than one global batch"):
        StepBatches(list(range(5)), collate=list, batch_size=8, micro_batch_size=8)
