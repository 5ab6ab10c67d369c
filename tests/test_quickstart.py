"""`alignkit quickstart`: the recipe, the stage registry, and (slow) the whole pipeline with --fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit import quickstart as Q
from alignkit.cli import main
from alignkit.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_packaged_recipe_and_overrides() -> None:
    recipe = Q.load_recipe(None)
    assert recipe["stages"] == ["data", "tokenizer", "pretrain", "sft", "evaluate", "report"]
    assert all(stage in Q.STAGES for stage in recipe["stages"])
    fast = Q.load_recipe(None, fast=True, overrides=["pretrain.train.max_steps=7", "sft.optim.lr=2e-4"])
    assert fast["pretrain"]["train"]["max_steps"] == 7  # command line wins over --fast
    assert fast["sft"]["optim"]["lr"] == 2e-4 and fast["sft"]["train"]["max_steps"] == 3
    assert fast["pretrain"]["model"]["init"]["hidden_size"] == 32
    assert fast["pretrain"]["train"]["batch_size"] == recipe["pretrain"]["train"]["batch_size"]  # untouched keys stay


def test_top_level_recipe_points_at_the_packaged_one(tmp_path: Path) -> None:
    assert Q.load_recipe(REPO_ROOT / "recipes" / "quickstart.yaml") == Q.load_recipe(None)
    # A user recipe lists only what it changes; sections merge key by key.
    (tmp_path / "mine.yaml").write_text("base: packaged:quickstart.yaml\npretrain:\n  train: {max_steps: 11}\n")
    mine = Q.load_recipe(tmp_path / "mine.yaml")
    assert mine["pretrain"]["train"]["max_steps"] == 11
    assert mine["pretrain"]["train"]["batch_size"] == Q.load_recipe(None)["pretrain"]["train"]["batch_size"]


def test_recipe_errors() -> None:
    with pytest.raises(ConfigError, match="does not start with a recipe section"):
        Q.load_recipe(None, overrides=["pretrian.train.max_steps=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        Q.load_recipe(None, overrides=["max_steps"])


def test_missing_earlier_stage_is_named(tmp_path: Path) -> None:
    recipe = Q.load_recipe(None, fast=True)
    recipe["stages"] = ["tokenizer"]
    with pytest.raises(ConfigError, match="needs the pretrain_text of stage 'data'"):
        Q.run_pipeline(recipe, tmp_path, log=lambda _: None)


def test_unknown_stage(tmp_path: Path) -> None:
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("stages: [data, ppo]\n")
    with pytest.raises(ConfigError, match="unknown stage 'ppo'"):
        Q.load_recipe(recipe_path)


@pytest.mark.slow
def test_quickstart_fast_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "qs"
    assert main(["quickstart", "--fast", "--output", str(out)]) == 0
    for stage in ("data", "tokenizer", "pretrain", "sft", "evaluate"):
        assert (out / stage).is_dir()
    assert (out / "pretrain" / "final" / "model.safetensors").is_file()
    assert (out / "sft" / "final" / "model.safetensors").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    report = (out / "report.md").read_text()
    assert "| pretrain | 3 |" in report and "| sft | 3 |" in report
    rows = [json.loads(line) for line in (out / "evaluate" / "metrics.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["pretrain", "sft"]
    recipe = Q.load_recipe(None, fast=True)
    for row in rows:
        assert 0.0 <= row["accuracy/heldout"] <= 1.0
        assert row["num_problems"] == recipe["data"]["eval_problems"]
        assert row["eval/loss"] > 0
    # The held-out file never shares an operand pair with the SFT training file.
    def pairs(path: Path) -> set[str]:
        return {json.loads(line)["messages"][1]["content"].split(" =")[0] for line in path.read_text().splitlines()}
    assert not pairs(out / "data" / "sft_train.jsonl") & pairs(out / "data" / "sft_eval.jsonl")
    printed = capsys.readouterr().out
    assert "held-out acc" in printed and f"report: {out / 'report.md'}" in printed
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
