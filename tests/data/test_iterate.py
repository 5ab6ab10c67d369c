"""batch_iterator: deterministic shuffles, disjoint covering shards, exact resume."""

from __future__ import annotations

import pytest

from alignkit.data import batch_iterator
from alignkit.errors import DataError


def test_deterministic_and_reshuffled_per_epoch() -> None:
    items = list(range(20))
    a = batch_iterator(items, batch_size=4, shuffle=True, seed=3)
    b = batch_iterator(items, batch_size=4, shuffle=True, seed=3)
    epoch0, epoch1 = list(a), list(a)
    assert epoch0 == list(b) and epoch1 == list(b)
    assert epoch0 != epoch1  # a fresh order every epoch
    assert sorted(x for batch in epoch0 for x in batch) == items
    assert list(batch_iterator(items, batch_size=4, shuffle=False, seed=3))[0] == [0, 1, 2, 3]
    assert list(batch_iterator(items, batch_size=4, shuffle=True, seed=4)) != epoch0


@pytest.mark.parametrize(("n", "drop_last"), [(23, True), (23, False), (24, True)])
def test_shards_disjoint_equal_and_covering(n: int, drop_last: bool) -> None:
    items = list(range(n))
    world = 3
    shards = [
        [x for batch in batch_iterator(items, batch_size=2, shuffle=True, seed=0, rank=r, world_size=world,
                                       drop_last=drop_last) for x in batch]
        for r in range(world)
    ]
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1  # every rank takes the same number of steps
    seen = [x for s in shards for x in s]
    if drop_last:
        assert len(seen) == len(set(seen))  # disjoint
        per_rank = n // world // 2 * 2
        assert len(seen) == per_rank * world
    else:
        assert set(seen) == set(items)  # covering (the wrap-around repeats at most world - 1 items)
        assert len(seen) - len(set(seen)) <= world - 1


def test_drop_last_batches() -> None:
    it = batch_iterator(list(range(10)), batch_size=4, shuffle=False, seed=0, drop_last=True)
    assert len(it) == 2 and [len(b) for b in it] == [4, 4]
    it = batch_iterator(list(range(10)), batch_size=4, shuffle=False, seed=0, drop_last=False)
    assert len(it) == 3 and [len(b) for b in it] == [4, 4, 2]


def test_resume_from_state_dict_yields_the_same_remaining_batches() -> None:
    items = list(range(30))
    reference = batch_iterator(items, batch_size=4, shuffle=True, seed=7, rank=1, world_size=2)
    full = [batch for _ in range(3) for batch in reference]  # three epochs
    interrupted = batch_iterator(items, batch_size=4, shuffle=True, seed=7, rank=1, world_size=2)
    consumed = []
    stream = interrupted.forever()
    for _ in range(5):  # 3 batches per epoch: stop inside epoch 1
        consumed.append(next(stream))
    state = interrupted.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)
    resumed = batch_iterator(items, batch_size=4, shuffle=True, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    assert consumed + rest == full


def test_resume_with_other_settings_is_refused() -> None:
    state = batch_iterator(list(range(10)), batch_size=2, shuffle=True, seed=0).state_dict()
    other = batch_iterator(list(range(12)), batch_size=2, shuffle=True, seed=0)
    with pytest.raises(DataError, match="num_items=10, but this run has num_items=12"):
        other.load_state_dict(state)


def test_too_few_items_for_a_batch() -> None:
    with pytest.raises(DataError, match="3 examples make no batch of 2 per rank on 2 rank"):
        batch_iterator([1, 2, 3], batch_size=2, shuffle=False, seed=0, world_size=2)
