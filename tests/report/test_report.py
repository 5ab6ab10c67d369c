"""build_report on a hand-written run directory: the table holds the right numbers and the PNGs are real PNGs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from alignkit.errors import DataError
from alignkit.report import build_report, summarize_stage

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
    # Stage order from pipeline.json ("tokenizer" has no metrics and is skipped).
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    assert [line.split("|")[1].strip() for line in table[:4]] == ["pretrain", "sft", "dpo", "evaluate"]
    # pretrain: 3 steps, first 5.0, last 3.5, best 3.25, eval 3.75, wall 3.5 s, mean tokens/s 2,000.
    assert "| pretrain | 3 | 5.0000 | 3.5000 | 3.2500 | 3.7500 | - | 3.5 s | 2,000 tokens/s |" in text
    # sft: wall time over two minutes is shown in minutes (260 s = 4.3 min); eval loss is the last one.
    assert "| sft | 20 | 1.5000 | 0.5000 | 0.5000 | 0.6250 | - | 4.3 min | - |" in text
    # dpo: final accuracy from rewards/accuracies.
    assert "| dpo | 2 | 0.6900 | 0.6000 | 0.6000 | - | 0.750 |" in text
    # evaluate: the last model's held-out accuracy, and a per-model table.
    assert "| evaluate | - | - | - | - | - | 0.875 |" in text
    assert "| model | accuracy/heldout | accuracy/train | num |" in text
    assert "| sft | 0.8750 | 0.9500 | 200 |" in text
    assert "| pretrain | 0.0000 | 0.0500 | 200 |" in text
    assert "ok  [sft] Tom has 1 apples" in text
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
    assert "| rm | 15 | 0.6900 | 0.5500 | 0.5500 | 0.6500 | 0.625 |" in text
    assert "Accuracy column: rm: eval/accuracy; dpo: rewards/accuracies." in text
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
