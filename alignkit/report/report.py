"""`build_report(run_dir)`: `report.md` with a metrics table per stage, plus PNG plots of the curves.

A run directory holds one folder per stage, each with its `metrics.jsonl` (one JSON object per logged step):

```
run_dir/pipeline.json          optional: {"stages": ["tokenizer", "pretrain", "sft", ...]} gives the order
run_dir/<stage>/metrics.jsonl  rows with "step" and any of: loss, eval/loss, tokens_per_s, elapsed_s,
                               accuracy keys, logps/chosen, logps/rejected; rows with a "model" key are
                               evaluation results for that model (one row per model)
run_dir/<stage>/examples.jsonl optional: {"model", "prompt", "completion", "correct"} sample generations
```

Plots use matplotlib's object API with the Agg canvas (no display, no global backend switch). Without
matplotlib the report says so and keeps the tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.data.readers import read_jsonl
from alignkit.errors import DataError

# Keys read as "the accuracy" of a stage, first key found wins: task accuracy, then the held-out reward-model / DPO
# accuracies, then the training-batch ones (a stage that evaluates logs both in its last row).
ACCURACY_KEYS = ("accuracy/heldout", "eval/accuracy", "eval/rewards/accuracies", "accuracy", "rewards/accuracies")
# Evaluation rows (one per model) are drawn as grouped bars, one bar per key present: (key, legend label).
EVALUATION_BARS = (("accuracy/heldout", "held-out task accuracy"),
                   ("accuracy/heldout_sampled", "held-out accuracy, sampled (T=1)"),
                   ("accuracy/preference_heldout", "held-out preference accuracy"))
LOGPS_KEYS = ("logps/chosen", "logps/rejected", "eval/logps/chosen", "eval/logps/rejected")
# DPO's likelihood diagnostics: policy minus reference log-prob (near 0, so on their own axes).
DELTA_KEYS = ("logps/chosen_delta", "logps/rejected_delta", "eval/logps/chosen_delta", "eval/logps/rejected_delta")
# RL stages (grpo per step, rs per round): the mean reward of the sampled answers, and how far the policy moved.
REWARD_KEYS = ("reward",)
DRIFT_KEYS = ("kl", "objective/kl", "entropy")
# The forgetting monitor (ppo's eval section and PTX data): held-out LM loss on the PTX domain, and the accuracy of
# each capability task (eval/<task>/accuracy), on a second axis.
FORGETTING_LOSS = "eval/ptx_loss"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of one `metrics.jsonl`; a malformed line is a DataError naming the file and line."""
    return read_jsonl(path)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in rows:
        value = _num(row.get(key))
        if value is not None and "model" not in row:
            steps.append(float(row.get("step", len(steps))))
            values.append(value)
    return steps, values


def _accuracy(row: dict[str, Any]) -> float | None:
    return _accuracy_with_key(row)[0]


def _accuracy_with_key(row: dict[str, Any]) -> tuple[float | None, str | None]:
    for key in ACCURACY_KEYS:
        value = _num(row.get(key))
        if value is not None:
            return value, key
    return None, None


@dataclass
class StageSummary:
    """The numbers of one stage that go into the report's table."""

    name: str
    steps: int | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    best_loss: float | None = None
    eval_loss: float | None = None
    accuracy: float | None = None
    # Which metric `accuracy` is (an rm stage's eval/accuracy and a dpo stage's rewards/accuracies are not task accuracy).
    accuracy_key: str | None = None
    wall_time_s: float | None = None
    tokens_per_s: float | None = None
    # Preference stages (rm, dpo) count pairs: their speed is pairs/s.
    pairs_per_s: float | None = None
    # Rows with a "model" key: evaluation results, one per evaluated model.
    evaluations: list[dict[str, Any]] = field(default_factory=list)


def summarize_stage(name: str, rows: list[dict[str, Any]]) -> StageSummary:
    """First / last / best training loss, last eval loss, final accuracy, steps, wall time, mean tokens/s."""
    summary = StageSummary(name=name, evaluations=[row for row in rows if "model" in row])
    curve = [row for row in rows if "model" not in row]
    _, losses = _series(curve, "loss")
    if losses:
        summary.first_loss, summary.last_loss, summary.best_loss = losses[0], losses[-1], min(losses)
    _, eval_losses = _series(curve, "eval/loss")
    if eval_losses:
        summary.eval_loss = eval_losses[-1]
    steps = [int(row["step"]) for row in curve if _num(row.get("step")) is not None]
    if steps:
        summary.steps = max(steps)
    for key in ACCURACY_KEYS:  # the last value of the first key any row has
        _, values = _series(curve, key)
        if values:
            summary.accuracy, summary.accuracy_key = values[-1], key
            break
    if summary.accuracy is None and summary.evaluations:
        summary.accuracy, summary.accuracy_key = _accuracy_with_key(summary.evaluations[-1])
        if summary.accuracy is not None:
            summary.accuracy_key = f"{summary.accuracy_key} of {summary.evaluations[-1]['model']}"
    _, elapsed = _series(curve, "elapsed_s")
    if elapsed:
        summary.wall_time_s = elapsed[-1]
    _, speeds = _series(curve, "tokens_per_s")
    if speeds:
        summary.tokens_per_s = sum(speeds) / len(speeds)
    _, pair_speeds = _series(curve, "pairs_per_s")
    if pair_speeds:
        summary.pairs_per_s = sum(pair_speeds) / len(pair_speeds)
    return summary


def _stage_order(run_dir: Path, stages: list[str] | None) -> list[str]:
    if stages is not None:
        return stages
    pipeline = run_dir / "pipeline.json"
    if pipeline.is_file():
        listed = json.loads(pipeline.read_text()).get("stages", [])
        return [s for s in listed if (run_dir / s / "metrics.jsonl").is_file()]
    return sorted(p.parent.name for p in run_dir.glob("*/metrics.jsonl"))


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _speed(s: StageSummary) -> str:
    if s.tokens_per_s is not None:
        return f"{s.tokens_per_s:,.0f} tokens/s"
    if s.pairs_per_s is not None:
        return f"{s.pairs_per_s:,.1f} pairs/s"
    return "-"


def _stage_table(summaries: list[StageSummary]) -> list[str]:
    lines = [
        "| stage | steps | first loss | last loss | best loss | eval loss | accuracy | wall time | speed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.name} | {'-' if s.steps is None else s.steps} | {_fmt(s.first_loss)} | {_fmt(s.last_loss)} | "
            f"{_fmt(s.best_loss)} | {_fmt(s.eval_loss)} | {_fmt(s.accuracy, '.3f')} | {_duration(s.wall_time_s)} | "
            f"{_speed(s)} |"
        )
    keyed = [f"{s.name}: {s.accuracy_key}" for s in summaries if s.accuracy_key is not None]
    if keyed:
        lines += ["", "Accuracy column: " + "; ".join(keyed) + "."]
    return lines


def _evaluation_table(summary: StageSummary) -> list[str]:
    keys: list[str] = []
    for row in summary.evaluations:
        keys += [k for k, v in row.items() if k not in ("model", "step") and _num(v) is not None and k not in keys]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for row in summary.evaluations:
        cells = []
        for key in keys:
            value = _num(row.get(key))
            spec = ".0f" if key.startswith("num") else ".4f"
            cells.append(_fmt(value, spec))
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return lines


def _examples(path: Path, limit: int = 6) -> list[str]:
    rows = read_metrics(path)[:limit]
    lines = ["```"]
    for row in rows:
        mark = "ok " if row.get("correct") else "BAD"
        model = f"[{row['model']}] " if "model" in row else ""
        lines.append(f"{mark} {model}{row.get('prompt', '')}")
        lines.append(f"    -> {row.get('completion', '')!r}")
    return [*lines, "```"]


def _plots(run_dir: Path, stages: dict[str, list[dict[str, Any]]], summaries: list[StageSummary]) -> list[str]:
    """Write the PNGs and return their file names (empty when there is nothing to plot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    curves = {name: rows for name, rows in stages.items() if _series(rows, "loss")[1]}
    if curves:
        # At most three panels per row, so a pipeline with pretrain, sft, rm and dpo stays readable.
        columns = min(3, len(curves))
        grid_rows = math.ceil(len(curves) / columns)
        fig = Figure(figsize=(5 * columns, 3.6 * grid_rows), layout="constrained")
        FigureCanvasAgg(fig)
        for i, (name, rows) in enumerate(curves.items()):
            ax = fig.add_subplot(grid_rows, columns, i + 1)
            ax.plot(*_series(rows, "loss"), label="train loss", linewidth=1.2)
            eval_steps, eval_values = _series(rows, "eval/loss")
            if eval_values:
                ax.plot(eval_steps, eval_values, "o-", label="eval loss", markersize=4)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.savefig(run_dir / "loss.png", dpi=100)
        written.append("loss.png")

    written += _accuracy_plot(run_dir, summaries)

    # DPO-family stages log the policy's log-probs of chosen and rejected responses (and their change relative to
    # the reference); RL stages their mean reward, and the policy's KL to the reference and its entropy. Plot
    # whichever are present.
    for keys, filename, what in ((LOGPS_KEYS, "logps.png", "log-probs"),
                                 (DELTA_KEYS, "logps_delta.png", "log-prob - reference"),
                                 (REWARD_KEYS, "reward.png", "mean reward"),
                                 (DRIFT_KEYS, "kl.png", "KL to the reference, entropy")):
        written += _curves_plot(run_dir, stages, keys, filename, what)
    written += _forgetting_plot(run_dir, stages)
    return written


def _capability_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys = {key for row in rows for key in row if key.startswith("eval/") and key.endswith("/accuracy")
            and key.count("/") == 2}
    return sorted(key for key in keys if _series(rows, key)[1])


def _forgetting_plot(run_dir: Path, stages: dict[str, list[dict[str, Any]]]) -> list[str]:
    """`forgetting.png`: per stage that logs them, eval/ptx_loss (left axis) and eval/<task>/accuracy (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    monitored = {name: rows for name, rows in stages.items()
                 if _series(rows, FORGETTING_LOSS)[1] or _capability_keys(rows)}
    if not monitored:
        return []
    # One loss scale for every panel, from 0: stages with and without PTX compare at a glance.
    top = max((v for rows in monitored.values() for v in _series(rows, FORGETTING_LOSS)[1]), default=1.0)
    fig = Figure(figsize=(5 * len(monitored), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, rows) in enumerate(monitored.items()):
        ax = fig.add_subplot(1, len(monitored), i + 1)
        handles = []
        steps, values = _series(rows, FORGETTING_LOSS)
        if values:
            handles += ax.plot(steps, values, "o-", color="tab:red", label=FORGETTING_LOSS, markersize=3)
            ax.set_ylabel("held-out LM loss")
            ax.set_ylim(0, top * 1.05)
        accuracy_ax = ax.twinx()
        for key in _capability_keys(rows):
            handles += accuracy_ax.plot(*_series(rows, key), "s--", label=key, markersize=3)
        accuracy_ax.set_ylim(0, 1.05)
        accuracy_ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: forgetting monitor")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=8)
    fig.savefig(run_dir / "forgetting.png", dpi=100)
    return ["forgetting.png"]


def _accuracy_plot(run_dir: Path, summaries: list[StageSummary]) -> list[str]:
    """`accuracy.png`: grouped bars per evaluated model (task and preference accuracy) when a stage evaluated
    models; otherwise one bar per stage with an accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    evaluations = [row for s in summaries for row in s.evaluations]
    groups: list[str] = []
    series: list[tuple[str, list[float | None]]] = []
    if evaluations:
        groups = [str(row["model"]) for row in evaluations]
        for key, label in EVALUATION_BARS:
            values = [_num(row.get(key)) for row in evaluations]
            if any(v is not None for v in values):
                series.append((label, values))
        if not series:  # rows with other accuracy keys: the first one found per row
            series.append(("accuracy", [_accuracy(row) for row in evaluations]))
    else:
        groups = [s.name for s in summaries if s.accuracy is not None]
        series.append(("accuracy", [s.accuracy for s in summaries if s.accuracy is not None]))
    if not groups or all(v is None for _, values in series for v in values):
        return []
    fig = Figure(figsize=(max(4.0, 0.6 + len(groups) * (0.5 + 0.6 * len(series))), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    colors = ("tab:green", "tab:blue", "tab:orange")
    for j, (label, values) in enumerate(series):
        present = [(x, v) for x, v in enumerate(values) if v is not None]
        positions = [x - 0.4 + width * (j + 0.5) for x, _ in present]
        ax.bar(positions, [v for _, v in present], width=width, color=colors[j % len(colors)], label=label)
        for position, (_, v) in zip(positions, present):
            ax.text(position, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(range(len(groups))), groups)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy")
    ax.set_title("final accuracy")
    if len(series) > 1:
        ax.legend(loc="upper left", fontsize=8)
    fig.savefig(run_dir / "accuracy.png", dpi=100)
    return ["accuracy.png"]


def _curves_plot(run_dir: Path, stages: dict[str, list[dict[str, Any]]], keys: tuple[str, ...], filename: str,
                what: str) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written: list[str] = []
    logps = {name: rows for name, rows in stages.items() if any(_series(rows, k)[1] for k in keys)}
    if logps:
        fig = Figure(figsize=(5 * len(logps), 3.6), layout="constrained")
        FigureCanvasAgg(fig)
        for i, (name, rows) in enumerate(logps.items()):
            ax = fig.add_subplot(1, len(logps), i + 1)
            for key in keys:
                steps, values = _series(rows, key)
                if values:
                    ax.plot(steps, values, "o-" if key.startswith("eval/") else "-", label=key, markersize=3)
            ax.set_title(f"{name}: {what}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.savefig(run_dir / filename, dpi=100)
        written.append(filename)
    return written


def build_report(run_dir: str | Path, *, stages: list[str] | None = None, title: str | None = None,
                 summary: Sequence[str] = ()) -> Path:
    """Write `run_dir/report.md` (and `loss.png`, `accuracy.png`, `logps.png`, `reward.png`, ... when there is data)
    and return its path.

    `stages` picks and orders the stage folders; by default the order of `pipeline.json`, else alphabetical.
    `summary`: markdown lines placed before the stage table (a pipeline's headline numbers).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist; pass the folder a pipeline or training run wrote.")
    names = _stage_order(run_dir, stages)
    rows_by_stage: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        path = run_dir / name / "metrics.jsonl"
        if not path.is_file():
            raise DataError(f"stage {name!r} has no metrics file at {path}; check the stage name.")
        rows_by_stage[name] = read_metrics(path)
    summaries = [summarize_stage(name, rows) for name, rows in rows_by_stage.items()]

    lines = [f"# {title or 'Run report'}", "", f"Run directory: `{run_dir}`", "", *summary]
    if summary and summary[-1]:
        lines.append("")
    lines += ["## Stages", ""]
    lines += _stage_table(summaries) if summaries else ["No stage wrote a metrics.jsonl yet."]
    lines.append("")
    for s in summaries:
        if s.evaluations:
            lines += [f"## Evaluation ({s.name})", "", *_evaluation_table(s), ""]
        examples = run_dir / s.name / "examples.jsonl"
        if examples.is_file():
            lines += [f"### Sample generations ({s.name})", "", *_examples(examples), ""]

    lines += ["## Plots", ""]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        lines.append("Plots skipped: matplotlib is not installed (`pip install matplotlib`, or `pip install alignkit[extras]`).")
    else:
        written = _plots(run_dir, rows_by_stage, summaries)
        lines += [f"![{Path(name).stem}]({name})" for name in written] or ["No curves to plot."]
    lines.append("")
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
