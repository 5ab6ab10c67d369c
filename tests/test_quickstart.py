"""`alignkit quickstart`: the recipe, the stage registry, and (slow) the whole pipeline with --fast."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main
from alignkit.config import config_to_dict
from alignkit.errors import ConfigError
from alignkit.pipeline import STAGES, load_recipe, run_pipeline
from alignkit.report.summary import comparison, summary_table
from tests.conftest import QuickstartRun

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_packaged_recipe_and_overrides() -> None:
    recipe = load_recipe(None)
    assert recipe.stages == ["data", "tokenizer", "pretrain", "sft", "rm", "dpo", "rs", "grpo", "ppo", "ppo_ptx",
                             "evaluate", "report"]
    assert recipe.evaluate.models == ["pretrain", "sft", "dpo", "rs", "grpo", "ppo", "ppo_ptx"]
    assert recipe.evaluate.reward_models == ["rm"]
    assert recipe.ppo.ppo.ptx_coef == 0.0 and recipe.ppo_ptx.ptx_coef > 0
    assert all(stage in STAGES for stage in recipe.stages)
    fast = load_recipe(None, fast=True, overrides=["pretrain.train.max_steps=7", "sft.optim.lr=2e-4"])
    assert fast.pretrain.train.max_steps == 7  # command line wins over --fast
    assert fast.sft.optim.lr == 2e-4 and fast.sft.train.max_steps == 3
    assert fast.pretrain.model.init["hidden_size"] == 32
    assert fast.pretrain.train.batch_size == recipe.pretrain.train.batch_size  # untouched keys stay


def test_top_level_recipe_points_at_the_packaged_one(tmp_path: Path) -> None:
    assert load_recipe(REPO_ROOT / "recipes" / "quickstart.yaml") == load_recipe(None)
    # A user recipe lists only what it changes; sections merge key by key.
    (tmp_path / "mine.yaml").write_text("base: packaged:quickstart.yaml\npretrain:\n  train: {max_steps: 11}\n")
    mine = load_recipe(tmp_path / "mine.yaml")
    assert mine.pretrain.train.max_steps == 11
    assert mine.pretrain.train.batch_size == load_recipe(None).pretrain.train.batch_size


def test_recipe_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key pretrian .*Did you mean pretrain"):
        load_recipe(None, overrides=["pretrian.train.max_steps=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_recipe(None, overrides=["max_steps"])
    # Every section is typed and checked when the recipe loads, not when its stage starts minutes later.
    with pytest.raises(ConfigError, match=r"unknown config key data.sft_wrong_operation_sharee .*Did you mean"):
        load_recipe(None, overrides=["data.sft_wrong_operation_sharee=0.5"])
    with pytest.raises(ConfigError, match=r"dpo.optim.lrr"):
        load_recipe(None, overrides=["dpo.optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size must be int"):
        load_recipe(None, overrides=["tokenizer.vocab_size=big"])
    with pytest.raises(ConfigError, match=r"evaluate.max_new_tokens must be at least 1"):
        load_recipe(None, overrides=["evaluate.max_new_tokens=0"])
    (tmp_path / "typo.yaml").write_text("base: packaged:quickstart.yaml\nevaluate: {modles: [sft]}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key evaluate.modles"):
        load_recipe(tmp_path / "typo.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.sft_wrong_operation_sharee=0.5",
         r"unknown config key data\.sft_wrong_operation_sharee .*Did you mean data\.sft_wrong_operation_share\?"
         r".*Valid keys here: difficulty, pretrain_problems, .*sft_wrong_operation_share, .*grpo_problems\."),
        ("grpo.train.max_stepz=3",
         r"unknown config key grpo\.train\.max_stepz .*Did you mean grpo\.train\.max_steps\?.*Valid keys here: "
         r"batch_size, .*max_steps"),
        ("tokenizer.vocab_sise=300", r"unknown config key tokenizer\.vocab_sise .*Did you mean tokenizer\.vocab_size"),
        ("evaluate.max_new_token=4", r"unknown config key evaluate\.max_new_token .*evaluate\.max_new_tokens"),
        ("pretrain.model.init.hidden_sise=8", r"model\.init\.hidden_sise is not a ModelConfig field\. Did you mean "
                                              r"model\.init\.hidden_size"),
        # A setting at odds with what the pipeline fills in (sft starts from the pretrained model's path).
        ("sft.model.init={hidden_size: 8}", r"stage sft .*model\.path and model\.init are both set"),
        ("ppo.train.batch_size=6", r"in ppo\.train: train\.batch_size 6 is not a multiple"),
    ],
)
def test_typos_fail_before_any_stage_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str,
                                         message: str) -> None:
    out = tmp_path / "qs"
    assert main(["quickstart", "--output", str(out), override]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists()  # nothing ran: not even the data stage made its folder


def test_stage_config_is_the_section_with_the_pipeline_paths() -> None:
    from alignkit.pipeline.recipe import stage_config

    recipe = load_recipe(None)

    def path(stage: str, key: str) -> str:
        return f"runs/x/{stage}/{key}"

    sft = stage_config(recipe, "sft", path, output_dir="runs/x/sft")
    assert (sft.model.path, sft.data.train, sft.data.eval) == ("runs/x/pretrain/model_dir", "runs/x/data/sft_train",
                                                               "runs/x/data/sft_eval")
    assert sft.train.output_dir == "runs/x/sft" and sft.optim.lr == recipe.sft.optim.lr
    ptx = stage_config(recipe, "ppo_ptx", path, output_dir="runs/x/ppo_ptx")
    assert ptx.ppo.reward_funcs == ["rm:runs/x/rm/model_dir"] and ptx.ppo.ptx_coef == recipe.ppo_ptx.ptx_coef
    assert stage_config(recipe, "ppo", path, output_dir="o").ppo.ptx_coef == 0.0
    assert recipe.sft.model.path is None and recipe.ppo.ppo.ptx_coef == 0.0  # the recipe itself is left as it was


def test_missing_earlier_stage_is_named(tmp_path: Path) -> None:
    recipe = load_recipe(None, fast=True)
    recipe.stages = ["tokenizer"]
    with pytest.raises(ConfigError, match="stage 'tokenizer' needs stage 'data' .*, but 'data' is not in the list"):
        run_pipeline(recipe, tmp_path / "run", log=lambda _: None)
    assert not (tmp_path / "run").exists()  # checked before anything is written


@pytest.mark.parametrize(("stages", "message"), [
    # dpo without sft: its policy and reference are the SFT model.
    ("[data, tokenizer, pretrain, dpo, evaluate]", re.escape("stage 'dpo' needs stage 'sft' (the SFT model, which is "
                                                             "both the starting policy and the reference), but 'sft' "
                                                             "is not in the list; put 'sft' before 'dpo'")),
    ("[data, tokenizer, pretrain, rm, sft]", "stage 'rm' needs stage 'sft' .*, but 'sft' comes after it; put 'sft' "
                                             "before 'rm'"),
    # evaluate lists dpo (the packaged evaluate.models) and rm, which did not run.
    ("[data, tokenizer, pretrain, sft, evaluate]", "stage 'evaluate' needs stage 'dpo' .*evaluate.models"),
])
def test_stage_order_errors_name_both_stages(tmp_path: Path, stages: str, message: str) -> None:
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"base: packaged:quickstart.yaml\nstages: {stages}\n")
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe_path)
    # Without dpo / rm in evaluate's lists, the SFT-only pipeline is valid.
    ok = load_recipe(None, overrides=["stages=[data, tokenizer, pretrain, sft, evaluate, report]",
                                      "evaluate.models=[pretrain, sft]", "evaluate.reward_models=[]"])
    assert ok.stages[-2:] == ["evaluate", "report"]


def test_summary_table_compares_sft_and_dpo() -> None:
    rows = {
        "sft": {"accuracy/heldout": 0.82, "accuracy/heldout_sampled": 0.5, "wrong_operation/heldout_sampled": 0.3,
                "accuracy/train_pairs": 0.977,
                "accuracy/heldout_plain_text": 0.447,
                "accuracy/preference_heldout": 0.953, "preference/logp_margin": 14.0, "eval/loss": 0.07},
        "dpo": {"accuracy/heldout": 0.8, "accuracy/train_pairs": 0.97, "accuracy/heldout_plain_text": 0.4,
                "accuracy/preference_heldout": 0.99, "preference/logp_margin": 15.5, "eval/loss": 0.08},
        "rm": {"accuracy/preference_heldout": 0.625},
    }
    lines = summary_table(rows, compare=("sft", "dpo"), seconds={"evaluate": 12.0, "dpo": 40.4}).splitlines()
    assert lines[0].split() == ["model", "held-out", "acc", "sampled", "acc", "sampled", "wrong-op", "train-pair",
                                "acc", "plain-text", "acc", "pref", "acc", "answer", "loss"]
    assert lines[1].split() == ["sft", "0.820", "0.500", "0.300", "0.977", "0.447", "0.953", "0.070"]
    # dpo was not sampled: "-" in those columns, and no sampled line in the comparison.
    assert lines[2].split() == ["dpo", "0.800", "-", "-", "0.970", "0.400", "0.990", "0.080"]
    assert lines[3].split() == ["rm", "-", "-", "-", "-", "-", "0.625", "-"]
    assert lines[4] == "held-out task accuracy: sft 0.820 -> dpo 0.800 (-0.020)"
    assert not any("sampled" in line for line in lines[4:])
    assert lines[5] == "held-out preference accuracy: sft 0.953 -> dpo 0.990 (+0.037)"
    assert lines[6] == "held-out log-prob margin, chosen - rejected: sft 14.000 -> dpo 15.500 (+1.500)"
    assert lines[7] == "time: evaluate 12s, dpo 40s; total 52s"
    # Without a ppo row there is nothing to compare; a malformed evaluate.compare names the key.
    assert comparison(rows, "sft", "ppo") == []
    with pytest.raises(ConfigError, match="evaluate.compare"):
        load_recipe(None, overrides=["evaluate.compare=[dpo]"])


def test_unknown_stage(tmp_path: Path) -> None:
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("stages: [data, kto]\n")
    with pytest.raises(ConfigError, match="unknown stage 'kto'"):
        load_recipe(recipe_path)


@pytest.mark.slow
def test_quickstart_fast_end_to_end(quickstart_fast_run: QuickstartRun) -> None:
    out = quickstart_fast_run.path  # the session's one `alignkit quickstart --fast` run (tests/conftest.py)
    recipe = config_to_dict(load_recipe(None, fast=True))
    for stage in ("data", "tokenizer", "pretrain", "sft", "rm", "dpo", "rs", "grpo", "ppo", "ppo_ptx", "evaluate"):
        assert (out / stage).is_dir()
    for stage in ("pretrain", "sft", "rm", "dpo", "rs", "grpo", "ppo", "ppo_ptx"):
        assert (out / stage / "final" / "model.safetensors").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    # The reward model is exported as a score model; DPO cached its SFT-reference log-probs.
    assert json.loads((out / "rm" / "final" / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"]
    assert (out / "dpo" / "reference_logps.safetensors").is_file()

    def jsonl(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    # Training pairs from training operand pairs, held-out pairs from held-out ones, each a correct and a wrong answer.
    train_pairs, heldout_pairs = jsonl(out / "data" / "preferences.jsonl"), jsonl(out / "data" / "preferences_eval.jsonl")
    assert len(train_pairs) == recipe["data"]["preference_problems"]
    assert len(heldout_pairs) == recipe["data"]["preference_eval_problems"]
    for pair in train_pairs + heldout_pairs:
        assert pair["chosen"] != pair["rejected"] and "The answer is" in pair["rejected"]

    def pair_of(solution: str) -> str:
        return solution.split(" =")[0]
    assert not {pair_of(p["chosen"]) for p in train_pairs} & {pair_of(p["chosen"]) for p in heldout_pairs}

    # rm and dpo ran their steps and evaluated on every held-out pair, with finite numbers.
    rm_rows, dpo_rows = jsonl(out / "rm" / "metrics.jsonl"), jsonl(out / "dpo" / "metrics.jsonl")
    assert rm_rows[-1]["step"] == recipe["rm"]["train"]["max_steps"] == 2
    assert dpo_rows[-1]["step"] == recipe["dpo"]["train"]["max_steps"] == 2
    assert 0.0 <= rm_rows[-1]["eval/accuracy"] <= 1.0 and math.isfinite(rm_rows[-1]["eval/loss"])
    for key in ("eval/rewards/accuracies", "eval/rewards/margins", "eval/logps/chosen", "eval/logps/rejected_delta"):
        assert math.isfinite(dpo_rows[-1][key])
    assert dpo_rows[-1]["eval/logps/chosen"] < 0

    report = (out / "report.md").read_text()
    assert "| pretrain | 3 |" in report and "| sft | 3 |" in report
    assert "| rm | 2 |" in report and "| dpo | 2 |" in report and "| grpo | 2 |" in report
    grpo_rows = jsonl(out / "grpo" / "metrics.jsonl")
    assert grpo_rows[-1]["step"] == 2 and 0.0 <= grpo_rows[-1]["reward"] <= 1.0
    # Rejection sampling: one round, every prompt keeps its best sample (--fast has no threshold), then SFT on them.
    [rs_row] = jsonl(out / "rs" / "metrics.jsonl")
    assert rs_row["prompts"] == 8 and rs_row["pass_rate"] == 1.0 and rs_row["sft/examples"] == 8
    assert rs_row["sft/steps"] == 2 and len(jsonl(out / "rs" / "round_1" / "samples.jsonl")) == 16
    # PPO against the reward model, with and without PTX; both watch the pretraining text and plain-text problems.
    ppo_rows, ptx_rows = jsonl(out / "ppo" / "metrics.jsonl"), jsonl(out / "ppo_ptx" / "metrics.jsonl")
    rm_dir = str(out / "rm" / "final")
    for stage, stage_rows, coef in (("ppo", ppo_rows, 0.0), ("ppo_ptx", ptx_rows, recipe["ppo_ptx"]["ptx_coef"])):
        config = yaml.safe_load((out / stage / "config.yaml").read_text())
        assert config["ppo"]["ptx_coef"] == coef and config["ppo"]["reward_funcs"] == [f"rm:{rm_dir}"]
        assert stage_rows[-1]["step"] == 2 and math.isfinite(stage_rows[-1]["objective/scores"])
        assert math.isfinite(stage_rows[-1]["eval/ptx_loss"])
        assert 0 <= stage_rows[-1]["eval/heldout_plain_text/accuracy"] <= 1
    assert "loss/ptx" in ptx_rows[-1] and "loss/ptx" not in ppo_rows[-1]
    assert "rm: eval/accuracy; dpo: eval/rewards/accuracies" in report
    rows = jsonl(out / "evaluate" / "metrics.jsonl")
    assert [r["model"] for r in rows] == ["pretrain", "sft", "dpo", "rs", "grpo", "ppo", "ppo_ptx", "rm"]
    for row in rows[:7]:
        assert 0.0 <= row["accuracy/heldout"] <= 1.0
        # --fast samples 2 answers per problem: the accuracy is a count over 2 * eval_problems samples.
        samples = 2 * recipe["data"]["eval_problems"]
        assert round(row["accuracy/heldout_sampled"] * samples, 6).is_integer()
        assert row["num_problems"] == recipe["data"]["eval_problems"]
        assert row["eval/loss"] > 0
        assert 0.0 <= row["accuracy/preference_heldout"] <= 1.0 and math.isfinite(row["preference/logp_margin"])
        assert row["num_pairs"] == recipe["data"]["preference_eval_problems"]
    # The reward model's held-out accuracy in evaluate is the one its own final eval measured on the same pairs.
    assert rows[7]["accuracy/preference_heldout"] == pytest.approx(rm_rows[-1]["eval/accuracy"])
    assert "accuracy/heldout" not in rows[7]
    # The report's summary table has a row per evaluated model and states SFT vs DPO.
    assert "## Summary" in report and "| rm | - | - | - | - |" in report
    assert f"- held-out preference accuracy: sft {rows[1]['accuracy/preference_heldout']:.3f} -> dpo " in report
    # The held-out file never shares an operand pair with the SFT training file.
    def pairs(path: Path) -> set[str]:
        return {json.loads(line)["messages"][1]["content"].split(" =")[0] for line in path.read_text().splitlines()}
    assert not pairs(out / "data" / "sft_train.jsonl") & pairs(out / "data" / "sft_eval.jsonl")
    printed = quickstart_fast_run.printed
    assert "held-out acc" in printed and "pref acc" in printed and f"report: {out / 'report.md'}" in printed
    assert "held-out task accuracy: sft " in printed
    for name in ("loss.png", "accuracy.png", "logps.png", "logps_delta.png", "reward.png", "kl.png", "forgetting.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_help_names_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    from alignkit.pipeline.recipe import STAGE_NAMES

    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    missing = [name for name in STAGE_NAMES if not re.search(rf"\b{name} \(", text)]
    assert not missing, text
