"""HH-RLHF splits for PPO judged by a second reward model: the held-out pairs are exactly those the rm trainer holds
out under recipes/rm_smollm2_hh.yaml (compared token for token with the trainer's own code path), the two reward
models' halves are prompt-disjoint and cover the rest, PPO's prompts come from the held-out pairs only and load as
PPO loads them, and the win-rate prompts avoid both PPO's prompts and the judge's pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.config import load_config
from alignkit.data.pairs import tokenize_pairs
from alignkit.engine import DistInfo
from alignkit.eval.winrate import exclude_prompts, read_prompts
from alignkit.rollout.prompts import load_prompts
from alignkit.tasks import hh_prompts
from alignkit.trainers.common import load_tokenizer
from alignkit.trainers.preference_configs import RMConfig
from alignkit.trainers.preference_data import load_preference_data
from alignkit.trainers.rl_configs import PPOConfig
from tests.conftest import REPO_ROOT, smollm2_gguf_path


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "hh-rlhf").is_dir():
        pytest.skip(f"{SHARED_DATA / 'hh-rlhf'} is absent (set ALIGNKIT_SHARED_DATA to the shared data folder)")
    out = tmp_path_factory.mktemp("hh_ppo")
    return out, hh_prompts.write_splits(out, SHARED_DATA)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # about 30 s: the trainer's path tokenises all 6,202 pairs
def test_held_out_pairs_are_the_rm_recipes_own(written: tuple[Path, dict[str, int]], shared_data: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out, counts = written
    monkeypatch.setenv("ALIGNKIT_SHARED_DATA", str(shared_data))
    cfg = load_config(RMConfig, REPO_ROOT / "recipes" / "rm_smollm2_hh.yaml")
    ours = hh_prompts.data_section(shared_data)
    for key in ("train", "eval", "eval_size", "eval_fraction", "seed", "limit", "truncation", "max_length"):
        assert getattr(cfg.data, key) == getattr(ours, key), key
    # The recipe's tokenizer when installed (the split does not depend on it: truncation "left" drops no pair).
    gguf = smollm2_gguf_path()
    tokenizer = load_tokenizer(gguf if gguf else "byte")
    trainer = load_preference_data(cfg.data, tokenizer, DistInfo())
    options = dict(max_length=cfg.data.max_length, truncation="left", max_prompt_length=None, strict=False)
    held, _, _ = tokenize_pairs(read_jsonl(out / "heldout_pairs.jsonl"), tokenizer, source="held", **options)
    assert len(held) == len(trainer.eval) == hh_prompts.EVAL_SIZE == counts["held_out"]
    assert [h.example for h in held] == [t.example for t in trainer.eval]
    assert counts["rm_ppo_pairs"] + counts["rm_judge_pairs"] == len(trainer.train) == counts["kept"] - 256
    assert (counts["dropped_identical"], counts["dropped_unparsable"]) == (trainer.stats["dropped_identical"],
                                                                           trainer.stats["dropped_unparsable"])


def test_halves_are_prompt_disjoint_and_prompts_come_from_the_right_pairs(
        written: tuple[Path, dict[str, int]]) -> None:
    out, counts = written
    halves = {name: read_prompts(out / f"rm_{name}_pairs.jsonl") for name in ("ppo", "judge")}
    assert len(halves["ppo"]) == counts["rm_ppo_pairs"] and len(halves["judge"]) == counts["rm_judge_pairs"]
    # Neither half is more than 5% larger than the other.
    assert abs(counts["rm_ppo_pairs"] - counts["rm_judge_pairs"]) < 0.05 * counts["rm_ppo_pairs"]
    _, shared = exclude_prompts(halves["ppo"], [out / "rm_judge_pairs.jsonl"])
    assert shared == 0

    # PPO prompts: the distinct prompts of held-out pairs, multi-turn ones included, in neither half.
    ppo = read_prompts(out / "ppo_prompts.jsonl")
    assert len(ppo) == counts["ppo_prompts"] > counts["held_out_single_turn"] > 50
    kept, in_held_out = exclude_prompts(ppo, [out / "heldout_pairs.jsonl"])
    assert in_held_out == len(ppo) and not kept
    for half in ("ppo", "judge"):
        assert exclude_prompts(ppo, [out / f"rm_{half}_pairs.jsonl"])[1] == 0
    # Win-rate prompts: from RM-1's half, none of PPO's, none of the judge's.
    winrate = read_prompts(out / "winrate_prompts.jsonl")
    assert len(winrate) == hh_prompts.WINRATE_PROMPTS
    assert exclude_prompts(winrate, [out / "rm_ppo_pairs.jsonl"])[1] == len(winrate)
    assert exclude_prompts(winrate, [out / "rm_judge_pairs.jsonl", out / "ppo_prompts.jsonl"])[1] == 0


def test_ppo_reads_the_prompts_as_written(written: tuple[Path, dict[str, int]]) -> None:
    out, counts = written
    cfg = load_config(PPOConfig, REPO_ROOT / "recipes" / "ppo_smollm2_hh_lora.yaml")
    assert cfg.data.train == "runs/data/hh_ppo/ppo_prompts.jsonl"
    items = load_prompts(read_jsonl(out / "ppo_prompts.jsonl"), load_tokenizer("byte"), source="ppo_prompts",
                         max_prompt_length=10_000, require_answer=False)
    assert len(items) == counts["ppo_prompts"] and all(item.conversation for item in items)
    assert sum(len(item.messages) == 1 for item in items) == counts["held_out_single_turn"]
    assert all(item.messages[-1]["role"] == "user" for item in items)


def test_a_missing_data_folder_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert hh_prompts.main(["--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().startswith("hh_prompts: error: ") and not (tmp_path / "out").exists()


def test_the_recipes_load_and_differ_from_the_rm_recipe_only_in_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """RM-1 and the judge keep recipes/rm_smollm2_hh.yaml's settings on their halves; PPO optimises RM-1 with LoRA,
    the critic on the policy's shared base."""
    import dataclasses

    monkeypatch.setenv("ALIGNKIT_SHARED_DATA", "/data")
    original = load_config(RMConfig, REPO_ROOT / "recipes" / "rm_smollm2_hh.yaml")
    for name, half in (("rm_smollm2_hh_ppo", "ppo"), ("rm_smollm2_hh_judge", "judge")):
        cfg = load_config(RMConfig, REPO_ROOT / "recipes" / f"{name}.yaml")
        assert cfg.data.train == f"runs/data/hh_ppo/rm_{half}_pairs.jsonl"
        assert cfg.data.eval == "runs/data/hh_ppo/heldout_pairs.jsonl"
        for key in ("format", "max_length", "truncation", "seed", "packing", "limit"):
            assert getattr(cfg.data, key) == getattr(original.data, key), (name, key)
        for section in ("model", "optim", "lora", "rm"):
            assert getattr(cfg, section) == getattr(original, section), (name, section)
        assert dataclasses.replace(cfg.train, output_dir="") == dataclasses.replace(original.train, output_dir="")
        assert cfg.train.output_dir == f"runs/{name}"
    ppo = load_config(PPOConfig, REPO_ROOT / "recipes" / "ppo_smollm2_hh_lora.yaml")
    assert ppo.ppo.reward_funcs == ["rm:runs/rm_smollm2_hh_ppo/final"]
    assert ppo.lora.enabled and ppo.ppo.critic_init == "policy" and ppo.train.precision == "bf16"
    assert ppo.model.path == "smollm2-135m-instruct" and 20 <= ppo.train.max_steps <= 40
