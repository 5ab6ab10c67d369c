"""Several training sources mixed by weight (data.train as a list): what each source contributes, the order within
a source, determinism under the seed, and the errors for bad weights."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from alignkit.config import config_from_dict, load_config
from alignkit.data.mixing import mix_sources, mixture_counts, normalise_weights
from alignkit.errors import ConfigError
from alignkit.trainers.configs import DataSection, SFTConfig


def test_counts_take_the_first_source_once_and_the_others_in_proportion() -> None:
    # 0.8 / 0.2: a quarter as many replay examples as domain ones.
    assert mixture_counts([100, 1000], normalise_weights([0.8, 0.2], 2)) == [100, 25]
    assert mixture_counts([10, 3, 7], normalise_weights([1, 1, 2], 3)) == [10, 10, 20]
    assert normalise_weights(None, 4) == [0.25] * 4


def test_each_source_is_used_without_repeats_before_it_is_exhausted() -> None:
    domain = [("d", i) for i in range(10)]
    general = [("g", i) for i in range(4)]
    mixture, counts = mix_sources([domain, general], [1, 1.5], seed=3)
    assert counts == [10, 15] and len(mixture) == 25
    assert sorted(x for x in mixture if x[0] == "d") == domain  # every domain example exactly once
    drawn = [x for x in mixture if x[0] == "g"]
    # 15 from 4: three full passes (each a permutation) then 3 of a fourth.
    for start in (0, 4, 8):
        assert sorted(drawn[start : start + 4]) == general
    assert len(set(drawn[12:])) == 3
    assert Counter(drawn).most_common(1)[0][1] == 4


def test_the_mixture_is_fixed_by_the_seed() -> None:
    a = [f"a{i}" for i in range(50)]
    b = [f"b{i}" for i in range(80)]
    first, _ = mix_sources([a, b], [0.5, 0.5], seed=1)
    assert first == mix_sources([a, b], [0.5, 0.5], seed=1)[0]
    assert first != mix_sources([a, b], [0.5, 0.5], seed=2)[0]
    # A source's draw depends on its own generator only: adding a third source leaves the first two's as they were.
    with_c, _ = mix_sources([a, b, ["c0", "c1"]], [0.5, 0.5, 0.1], seed=1)
    assert [x for x in with_c if not x.startswith("c")] == first


@pytest.mark.parametrize(("weights", "message"), [
    ([1.0], "has 1 weights for 2 sources"),
    ([1.0, -0.5], "finite and non-negative"),
    ([0.0, 0.0], "sum to a positive number"),
    ([0.0, 1.0], "its weight must be positive"),
    ([1.0, float("nan")], "finite and non-negative"),
])
def test_bad_weights_are_refused_at_load(weights: list[float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DataSection(train=["a.jsonl", "b.jsonl"], weights=weights)


def test_train_takes_a_list_in_yaml_and_on_the_command_line(tmp_path: Path) -> None:
    cfg = config_from_dict(SFTConfig, {"data": {"train": ["a.jsonl", "b.jsonl"], "weights": [3, 1]}})
    assert cfg.data.sources == ["a.jsonl", "b.jsonl"] and cfg.data.weights == [3.0, 1.0]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train: one.jsonl\n")
    assert load_config(SFTConfig, recipe).data.train == "one.jsonl"
    assert load_config(SFTConfig, recipe, ["data.train=[x.jsonl, y.jsonl]"]).data.sources == ["x.jsonl", "y.jsonl"]
    assert load_config(SFTConfig, recipe, ["data.train=[z.jsonl]"]).data.train == "z.jsonl"
    with pytest.raises(ConfigError, match="grpo training reads one"):
        DataSection(train=["a.jsonl", "b.jsonl"]).single_source("grpo")


def test_sft_mixes_its_sources_and_holds_out_from_the_first(tmp_path: Path) -> None:
    from alignkit.trainers.common import load_tokenizer
    from alignkit.trainers.language import load_examples

    def write(name: str, n: int) -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"instruction": f"{name} question {i}", "output": f"answer {i}"}) + "\n"
                                for i in range(n)))
        return str(path)

    tokenizer = load_tokenizer("byte")
    data = DataSection(train=[write("domain.jsonl", 40), write("general.jsonl", 12)], weights=[0.75, 0.25],
                       eval_size=8, max_length=64)
    train, held_out = load_examples(data, tokenizer)
    text = lambda e: tokenizer.decode(e.input_ids)  # noqa: E731
    assert len(held_out) == 8 and all("domain.jsonl" in text(e) for e in held_out)
    assert len(train) == 32 + round(32 * 0.25 / 0.75)
    assert sum("general.jsonl" in text(e) for e in train) == 11
    held = {text(e) for e in held_out}
    assert not held & {text(e) for e in train}  # held-out domain examples never train
    again, _ = load_examples(data, tokenizer)
    assert [text(e) for e in again] == [text(e) for e in train]
