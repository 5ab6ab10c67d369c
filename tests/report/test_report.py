"""build_report on a hand-written run directory: the table holds the right numbers and the PNGs are real PNGs;
on a real `alignkit quickstart --fast` run (slow): a report a person can read (every column defined, samples of
every model, every plot's axes labelled, try-it commands that run)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from alignkit.errors import DataError
from alignkit.report import build_report, read_metrics, report_figures, summarize_stage, try_it_commands
from alignkit.report.report import STEP_LABEL
from tests.conftest import QuickstartRun

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(stage_dir: Path, rows: list[dict]) -> None:
    stage_dir.mkdir(parents=True)
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_run(root: Path) -> Path:
    run = root / "run"
    _write(run / "pretrain", [
        {"step": 1, "loss": 5.0, "tokens_per_s": 1000.0, "elapsed_s": 1.0},
        {"step": 2, "loss": 3.25, "tokens_per_s": 3000.0, "elapsed_s": 2.0},
        {"step": 3, "loss": 3.5, "tokens_per_s": 2000.0, "elapsed_s": 3.5, "eval/loss": 3.75},
    ])
    _write(run / "sft", [
        {"step": 10, "loss": 1.5, "eval/loss": 1.25, "elapsed_s": 130.0},
        {"step": 20, "loss": 0.5, "eval/loss": 0.625, "elapsed_s": 260.0},
    ])
    _write(run / "evaluate", [
        {"step": 0, "model": "pretrain", "accuracy/heldout": 0.0, "accuracy/train": 0.05, "num": 200},
        {"step": 1, "model": "sft", "accuracy/heldout": 0.875, "accuracy/train": 0.95, "num": 200},
    ])
    (run / "evaluate" / "examples.jsonl").write_text(
        json.dumps({"model": "sft", "prompt": "Tom has 1 apples and buys 2 more.", "completion": "1 + 2 = 3. The answer is 3.",
                    "correct": True}) + "\n"
    )
    _write(run / "dpo", [
        {"step": 1, "loss": 0.69, "logps/chosen": -10.0, "logps/rejected": -10.0, "rewards/accuracies": 0.5},
        {"step": 2, "loss": 0.6, "logps/chosen": -9.0, "logps/rejected": -12.0, "rewards/accuracies": 0.75},
    ])
    (run / "pipeline.json").write_text(json.dumps({"stages": ["tokenizer", "pretrain", "sft", "dpo", "evaluate"]}))
    return run


def test_summary_numbers() -> None:
    rows = [{"step": 1, "loss": 5.0, "tokens_per_s": 1000.0}, {"step": 2, "loss": 3.25, "tokens_per_s": 3000.0},
            {"step": 3, "loss": 3.5, "eval/loss": 3.75, "elapsed_s": 3.5}]
    s = summarize_stage("pretrain", rows)
    assert (s.first_loss, s.last_loss, s.best_loss, s.eval_loss) == (5.0, 3.5, 3.25, 3.75)
    assert s.steps == 3 and s.wall_time_s == 3.5 and s.tokens_per_s == 2000.0  # mean of 1000 and 3000
    # Preference stages log pairs/s instead.
    pairs = summarize_stage("dpo", [{"step": 1, "loss": 0.69, "pairs_per_s": 1.5}, {"step": 2, "loss": 0.6,
                                                                                    "pairs_per_s": 2.5}])
    assert pairs.tokens_per_s is None and pairs.pairs_per_s == 2.0


def test_report_contents_and_plots(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    report = build_report(run)
    assert report == run / "report.md"
    text = report.read_text()
    # Stage order from pipeline.json ("tokenizer" has no metrics and is skipped); evaluate, which trains nothing,
    # has its own table.
    stages = text[text.index("## Stages"):text.index("## Evaluation")]
    table = [line for line in stages.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    assert [line.split("|")[1].strip() for line in table] == ["pretrain", "sft", "dpo"]
    # pretrain: 3 steps, first 5.0, last 3.5, best 3.25, held-out 3.75, wall 3.5 s, mean tokens/s 2,000.
    assert "| pretrain | 3 | 5.0000 | 3.5000 | 3.2500 | 3.7500 | - | - | 3.5 s | 2,000 tokens/s |" in text
    # sft: wall time over two minutes is shown in minutes (260 s = 4.3 min); the held-out loss is the last one.
    assert "| sft | 20 | 1.5000 | 0.5000 | 0.5000 | 0.6250 | - | - | 4.3 min | - |" in text
    # dpo: rewards/accuracies is a preference accuracy, never the task accuracy column.
    assert "| dpo | 2 | 0.6900 | 0.6000 | 0.6000 | - | - | 0.750 |" in text
    assert "Preference accuracy column: dpo: rewards/accuracies." in text
    # evaluate: a per-model table; known keys get their short names, the others keep theirs, all defined.
    assert "| model | held-out acc | accuracy/train | problems |" not in text  # "num" is not num_problems
    assert "| model | held-out acc | accuracy/train | num |" in text
    assert "| sft | 0.8750 | 0.9500 | 200 |" in text
    assert "| pretrain | 0.0000 | 0.0500 | 200 |" in text
    assert "- **held-out acc** (`accuracy/heldout`): share of the held-out problems" in text
    assert "- **`accuracy/train`**: logged by the stage; no description is registered." in text
    assert "ok    Tom has 1 apples" in text and "**sft**" in text
    for name in ("loss.png", "accuracy.png", "logps.png"):
        data = (run / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
        assert f"]({name})" in text
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(run / "loss.png").shape
    assert width > height > 100  # three stages with a loss curve side by side


def test_explicit_stages_and_no_logps(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    text = build_report(run, stages=["sft"]).read_text()
    assert "| sft |" in text and "| pretrain |" not in text
    assert not (run / "logps.png").exists()


def test_missing_matplotlib_is_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _fake_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    text = build_report(run).read_text()
    assert "matplotlib is not installed" in text
    assert "| pretrain | 3 |" in text
    assert not (run / "loss.png").exists()


def test_errors_name_the_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    (run / "sft" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss":\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: invalid JSON"):
        build_report(run)
    with pytest.raises(DataError, match="no metrics file"):
        build_report(run, stages=["pretrain"])
    with pytest.raises(DataError, match="does not exist"):
        build_report(tmp_path / "nope")


def test_preference_stages_summary_and_grouped_bars(tmp_path: Path) -> None:
    """An rm stage shows its held-out eval/accuracy (not the last training batch's), the line under the table says
    which metric each stage's accuracy is, `summary` lines come first, and evaluation rows with task and preference
    accuracy become grouped bars."""
    import matplotlib.image

    run = _fake_run(tmp_path)
    _write(run / "rm", [
        {"step": 5, "loss": 0.69, "accuracy": 0.5},
        {"step": 10, "loss": 0.6, "accuracy": 0.75, "eval/accuracy": 0.625, "eval/loss": 0.65},
        {"step": 15, "loss": 0.55, "accuracy": 0.875},  # logged after the last eval: still the eval number
    ])
    (run / "evaluate" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "model": "sft", "accuracy/heldout": 0.75, "accuracy/preference_heldout": 0.875},
        {"step": 1, "model": "dpo", "accuracy/heldout": 0.5, "accuracy/preference_heldout": 1.0},
        {"step": 2, "model": "rm", "accuracy/preference_heldout": 0.625},
    ]))
    (run / "pipeline.json").write_text(json.dumps({"stages": ["pretrain", "sft", "rm", "dpo", "evaluate"]}))
    text = build_report(run, summary=["## Summary", "", "- sft vs dpo"]).read_text()
    assert text.index("## Summary") < text.index("- sft vs dpo") < text.index("## Stages")
    assert "| rm | 15 | 0.6900 | 0.5500 | 0.5500 | 0.6500 | - | 0.625 |" in text
    assert "Preference accuracy column: rm: eval/accuracy; dpo: rewards/accuracies." in text
    assert "Task accuracy column" not in text
    # The evaluation table leaves a reward model's task accuracy empty.
    assert "| rm | - | 0.6250 |" in text
    # Four stages with a loss curve: two rows of at most three panels.
    height, width, _ = matplotlib.image.imread(run / "loss.png").shape
    assert (width, height) == (1500, 720)
    # Grouped bars, two per model: 0.6 + 3 models * (0.5 + 0.6 * 2 series) = 5.7 inches at 100 dpi.
    height, width, _ = matplotlib.image.imread(run / "accuracy.png").shape
    assert (width, height) == (570, 360)


def test_forgetting_plot_draws_each_monitored_stage(tmp_path: Path) -> None:
    """eval/ptx_loss and every eval/<task>/accuracy of a stage go into forgetting.png, one panel per stage; a run
    without them gets no such plot."""
    run = tmp_path / "run"
    for name, loss in (("ppo", 4.0), ("ppo_ptx", 1.0)):
        _write(run / name, [
            {"step": 0, "eval/ptx_loss": 4.1, "eval/plain/accuracy": 0.2},
            {"step": 2, "loss": 0.1, "reward": 1.0},
            {"step": 4, "loss": 0.05, "reward": 2.0, "eval/ptx_loss": loss, "eval/plain/accuracy": 0.3},
        ])
    text = build_report(run, stages=["ppo", "ppo_ptx"]).read_text()
    data = (run / "forgetting.png").read_bytes()
    assert data[:8] == PNG_MAGIC and "](forgetting.png)" in text
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(run / "forgetting.png").shape
    assert width > 1.8 * height  # two panels side by side
    build_report(_fake_run(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "run" / "forgetting.png").exists()


def _axis_problems(name: str, fig: Any) -> list[str]:
    """What a reader would miss on a figure: an axis without a label (a twin axis shares its x label), a y label
    without a unit in parentheses, an offset or scientific-notation multiplier above an axis, fractional steps."""
    fig.canvas.draw()
    problems = []
    for ax in fig.axes:
        where = f"{name} [{ax.get_title() or 'twin axis'}]"
        if not any(a.get_xlabel() for a in ax.get_shared_x_axes().get_siblings(ax)):
            problems.append(f"{where}: no x label")
        if "(" not in ax.get_ylabel():
            problems.append(f"{where}: y label {ax.get_ylabel()!r} has no unit")
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_offset_text().get_text():
                problems.append(f"{where}: offset text {axis.get_offset_text().get_text()!r}")
        if ax.get_xlabel() == STEP_LABEL:
            ticks = [t.get_text().replace("\u2212", "-") for t in ax.get_xticklabels() if t.get_text()]
            if not ticks or not all(re.fullmatch(r"-?\d+", t) for t in ticks):
                problems.append(f"{where}: step ticks {ticks}")
    return problems


def _rl_run(root: Path) -> Path:
    """_fake_run plus every other kind of curve: a near-constant rm loss (matplotlib would print it as an offset),
    RL rewards, KL and entropy, rs's one-row round, and ppo's forgetting monitor."""
    run = _fake_run(root)
    _write(run / "rm", [{"step": 1, "loss": 0.6931472, "eval/accuracy": 0.5},
                        {"step": 2, "loss": 0.6931475, "eval/loss": 0.6931471, "eval/accuracy": 0.5}])
    _write(run / "rs", [{"step": 1, "reward": 0.25}])
    _write(run / "grpo", [{"step": 1, "loss": 0.0, "reward": 0.5, "kl": 0.0, "entropy": 5.6967138},
                          {"step": 2, "loss": 0.0, "reward": 0.6, "kl": 0.001, "entropy": 5.6967001}])
    _write(run / "ppo", [{"step": 0, "eval/ptx_loss": 4.0, "eval/plain/accuracy": 0.25},
                         {"step": 1, "loss": 0.1, "reward": -1e-4, "objective/kl": 0.0},
                         {"step": 2, "loss": 0.2, "reward": -1.2e-4, "objective/kl": 4e-4, "eval/ptx_loss": 4.1}])
    (run / "pipeline.json").write_text(json.dumps({"stages": ["pretrain", "sft", "rm", "dpo", "rs", "grpo", "ppo",
                                                              "evaluate"]}))
    return run


def test_every_figure_labels_both_axes_without_offsets(tmp_path: Path) -> None:
    run = _rl_run(tmp_path)
    rows = {name: read_metrics(run / name / "metrics.jsonl")
            for name in ("pretrain", "sft", "rm", "dpo", "rs", "grpo", "ppo", "evaluate")}
    figures = report_figures(rows, [summarize_stage(name, r) for name, r in rows.items()])
    assert set(figures) == {"loss.png", "accuracy.png", "logps.png", "reward.png", "kl.png", "forgetting.png"}
    for name, fig in figures.items():
        assert _axis_problems(name, fig) == []
    # The loss's unit follows the stage's trainer (run.json), not its folder name.
    loss_axes = {ax.get_title(): ax for ax in figures["loss.png"].axes}
    assert loss_axes["pretrain"].get_ylabel() == "loss (nats per token)"
    assert loss_axes["rm"].get_ylabel() == "loss (nats per pair)"
    assert loss_axes["ppo"].get_ylabel() == "loss (surrogate objective, no unit)"
    relabelled = report_figures({"warmup": rows["pretrain"]}, [], {"warmup": "pretrain"})
    assert relabelled["loss.png"].axes[0].get_ylabel() == "loss (nats per token)"
    # The near-constant rm loss reads as plain numbers: 0.6931472 on the axis, no "+6.93e-1" above it.
    labels = [t.get_text() for t in loss_axes["rm"].get_yticklabels()]
    assert any(label.startswith("0.69314") for label in labels), labels
    kl_axes = {ax.get_title(): ax for ax in figures["kl.png"].axes}
    assert kl_axes["grpo: KL to the reference, entropy"].get_ylabel() == (
        "KL to the reference (nats per token)\nentropy (nats per token)")
    assert kl_axes["ppo: KL to the reference, entropy"].get_ylabel() == "KL to the reference (nats per answer)"


def test_sample_generations_show_every_model(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    models = ["pretrain", "sft", "dpo", "grpo"]
    (run / "evaluate" / "examples.jsonl").write_text("".join(
        json.dumps({"model": model, "prompt": f"question {i}", "completion": f"{model} answer {i}",
                    "reference": str(i), "correct": i == 0}) + "\n"
        for model in models for i in range(4)))
    text = build_report(run).read_text()
    samples = text[text.index("### Sample generations"):text.index("## Plots")]
    for model in models:
        block = samples.split(f"**{model}**")[1].split("```")[1]
        answers = re.findall(r"-> '(.*)'   \(expected (\d)\)", block)
        assert answers == [(f"{model} answer {i}", str(i)) for i in range(3)]  # the first three of each model
        assert block.count("ok    question 0") == 1 and block.count("WRONG question") == 2


def _export(stage_dir: Path, architecture: str, trainer: str | None = None) -> None:
    (stage_dir / "final").mkdir(parents=True)
    (stage_dir / "final" / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    if trainer is not None:
        (stage_dir / "run.json").write_text(json.dumps({"stage": trainer}))


def test_try_it_commands_per_model_kind(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    _export(run / "pretrain", "LlamaForCausalLM", "pretrain")
    _export(run / "sft", "LlamaForCausalLM")
    _write(run / "rm", [{"step": 1, "loss": 0.7}])
    _export(run / "rm", "LlamaForSequenceClassification", "rm")
    _export(run / "late", "LlamaForCausalLM", "pretrain")  # not a listed stage
    prompt, response = "Tom's 3 apples?", "3 + 1 = 4. The answer is 4."
    commands = dict(try_it_commands(run, ["pretrain", "sft", "rm", "dpo", "evaluate"], prompt=prompt,
                                    response=response))
    assert list(commands) == ["pretrain", "sft", "rm"]  # dpo and evaluate exported no model
    argv = {name: shlex.split(command) for name, command in commands.items()}
    assert argv["pretrain"] == ["alignkit", "generate", "--model", str(run / "pretrain"), "--prompt", prompt,
                                "--max-new-tokens", "32"]
    assert argv["sft"][:5] == ["alignkit", "generate", "--model", str(run / "sft"), "--chat"]
    assert argv["rm"] == ["alignkit", "score", "--model", str(run / "rm"), "--prompt", prompt, "--response", response]
    text = build_report(run, stages=["pretrain", "sft", "rm"], try_prompt=prompt, try_response=response).read_text()
    assert text.rstrip().endswith(f"```bash\n{commands['rm']}\n```")
    assert text.index("## Plots") < text.index("## Try the models")
    # Without a given prompt, the commands ask the first sample generation's question.
    assert "--prompt 'Tom has 1 apples and buys 2 more.'" in build_report(run).read_text()


def _tables(text: str) -> list[tuple[list[str], set[str]]]:
    """Each markdown table's headers, and the names the bullet list after it defines ("- **name**: ...", "- **a,
    b**: ..." defines a and b), up to the next heading."""
    lines = text.splitlines()
    tables = []
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            defined: set[str] = set()
            for after in lines[i + 2:]:
                if after.startswith("#"):
                    break
                match = re.match(r"- \*\*`?(.+?)`?\*\*", after)
                if match:
                    defined.update(name.strip() for name in match.group(1).split(", "))
            tables.append(([cell.strip() for cell in line.strip(" |").split("|")], defined))
    return tables


@pytest.mark.slow
def test_quickstart_report_is_readable(quickstart_fast_run: QuickstartRun) -> None:
    from alignkit.checkpoint import resolve_model_path
    from alignkit.cli import main
    from alignkit.pipeline import load_recipe

    run, recipe = quickstart_fast_run.path, load_recipe(None, fast=True)
    text = (run / "report.md").read_text()
    # Every column of every table is defined in words, by a registered description.
    tables = _tables(text)
    assert len(tables) == 3  # summary, stages, evaluation
    for headers, defined in tables:
        assert set(headers) <= defined, set(headers) - defined
    assert "no description is registered" not in text
    # The evaluated models' answer loss and a stage's own held-out loss have different names; no bare "accuracy".
    (summary, _), (stage, _), (evaluation, _) = tables
    assert "answer loss" in summary and "answer loss" in evaluation and "held-out loss" in stage
    assert "eval loss" not in text and "accuracy" not in stage + summary + evaluation
    # DPO's implicit-reward accuracy sits in the preference accuracy column.
    dpo_last = [row for row in read_metrics(run / "dpo" / "metrics.jsonl") if "eval/rewards/accuracies" in row][-1]
    dpo_row = next(line for line in text.splitlines() if line.startswith("| dpo | 2 |"))
    cells = [cell.strip() for cell in dpo_row.strip(" |").split("|")]
    assert cells[stage.index("preference accuracy")] == f"{dpo_last['eval/rewards/accuracies']:.3f}"
    assert cells[stage.index("task accuracy")] == "-"

    # A few sample generations of every evaluated model.
    samples = text[text.index("### Sample generations"):text.index("## Plots")]
    for model in recipe.evaluate.models:
        block = samples.split(f"**{model}**\n")[1].split("```")[1]
        assert len(re.findall(r"^(?:ok   |WRONG) ", block, flags=re.M)) == 3, model

    # A command for every exported model, at the end, naming folders that load; two of them run.
    try_it = text[text.index("## Try the models"):]
    argv = {}
    for line in try_it.splitlines():
        if line.startswith("alignkit "):
            words = shlex.split(line)
            argv[Path(words[words.index("--model") + 1]).name] = words
    exported = ["pretrain", "sft", "rm", "dpo", "rs", "grpo", "ppo", "ppo_ptx"]
    assert list(argv) == exported
    for name, words in argv.items():
        assert resolve_model_path(words[words.index("--model") + 1]) == run / name / "final"
        assert words[1] == ("score" if name == "rm" else "generate")
    assert "--prompt" in argv["pretrain"] and all("--chat" in argv[name] for name in exported[1:] if name != "rm")
    for name in ("dpo", "rm"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(argv[name][1:]) == 0
        if name == "rm":
            float(printed.getvalue())  # one reward

    # Every plot the report shows, rebuilt from the run's metrics: both axes labelled, with units, plain numbers.
    stages = [name for name in json.loads((run / "pipeline.json").read_text())["stages"]
              if (run / name / "metrics.jsonl").is_file()]
    rows = {name: read_metrics(run / name / "metrics.jsonl") for name in stages}
    trainers = {name: json.loads((run / name / "run.json").read_text())["stage"] for name in stages
                if (run / name / "run.json").is_file()}
    figures = report_figures(rows, [summarize_stage(name, r) for name, r in rows.items()], trainers)
    assert set(figures) == {"loss.png", "accuracy.png", "logps.png", "logps_delta.png", "reward.png", "kl.png",
                            "forgetting.png"}
    for name, fig in figures.items():
        assert f"]({name})" in text
        assert _axis_problems(name, fig) == []


def test_rejection_sampling_rounds_fill_the_stage_row() -> None:
    """rs logs one row per round: its fine-tuning loss (sft/loss) and the round's times stand in for loss and
    elapsed_s, so its stage-table row is not dashes."""
    from alignkit.report.report import summarize_stage

    rows = [{"step": 1, "sft/loss": 0.5, "time/sample_s": 10.0, "time/sft_s": 20.0},
            {"step": 2, "sft/loss": 0.25, "time/sample_s": 11.0, "time/sft_s": 19.0}]
    summary = summarize_stage("rs", rows)
    assert (summary.first_loss, summary.last_loss, summary.best_loss) == (0.5, 0.25, 0.25)
    assert summary.steps == 2 and summary.wall_time_s == 60.0
