"""`build_report(run_dir)`: `report.md` with a metrics table per stage, plus PNG plots of the curves.

A run directory holds one folder per stage, each with its `metrics.jsonl` (one JSON object per logged step):

```
run_dir/pipeline.json          optional: {"stages": ["tokenizer", "pretrain", "sft", ...]} gives the order
run_dir/<stage>/metrics.jsonl  rows with "step" and any of: loss, eval/loss, tokens_per_s, elapsed_s,
                               accuracy keys, logps/chosen, logps/rejected; rows with a "model" key are
                               evaluation results for that model (one row per model)
run_dir/<stage>/examples.jsonl optional: {"model", "prompt", "completion", "reference", "correct"} generations
run_dir/<stage>/run.json       optional: {"stage": trainer} (what `alignkit train` writes), for the loss's unit
run_dir/<stage>/final/         optional: the stage's exported model; the report ends with a command to try it
```

Every table is followed by a list that defines its columns, and every plot has both axes labelled with units.
Plots use matplotlib's object API with the Agg canvas (no display, no global backend switch); `report_figures`
builds them without writing anything, so tests can inspect the axes. Without matplotlib the report says so and
keeps the tables.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.data.readers import read_jsonl
from alignkit.errors import DataError
from alignkit.report.summary import MODEL_COLUMN, column_header, column_meanings

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# A stage's task accuracy: the held-out accuracy it measures itself (the first key found; eval/<task>/accuracy of a
# trainer's eval section is looked for after these).
TASK_ACCURACY_KEYS = ("accuracy/heldout",)
# A stage's preference accuracy, by its own measure, first key found wins: the held-out reward-model (rm) and
# implicit-reward (dpo, relative to its reference) pair accuracies, then the training-batch ones. Not task accuracy.
PREFERENCE_ACCURACY_KEYS = ("eval/accuracy", "eval/rewards/accuracies", "accuracy", "rewards/accuracies")
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
# The y-axis label of each curve key: what it is and its unit. grpo's kl and entropy are per-token means; ppo's
# objective/kl (TRL's name) is summed over an answer's tokens.
CURVE_LABELS = {
    **{key: "summed log-prob of the answer (nats)" for key in LOGPS_KEYS},
    **{key: "policy - reference log-prob (nats)" for key in DELTA_KEYS},
    "reward": "mean reward per sampled answer\n(reward function's units)",
    "kl": "KL to the reference (nats per token)",
    "entropy": "entropy (nats per token)",
    "objective/kl": "KL to the reference (nats per answer)",
}
# The forgetting monitor (ppo's eval section and PTX data): held-out LM loss on the PTX domain, and the accuracy of
# each capability task (eval/<task>/accuracy), on a second axis.
FORGETTING_LOSS = "eval/ptx_loss"
# The unit of a trainer's `loss` (run.json's "stage", else the stage folder's name); the RL trainers' losses are
# surrogate objectives with no unit.
# dpo's loss is in nats but per pair plus, with rpo_alpha, the chosen answer's per-token NLL.
LOSS_UNITS = {"pretrain": "nats per token", "sft": "nats per token", "rm": "nats per pair", "dpo": "nats"}
STEP_LABEL = "training step"
ACCURACY_LABEL = "accuracy (fraction, 0 to 1)"
# What the stage table's columns mean, in the table's order.
STAGE_COLUMNS = (
    ("stage", "a folder of the run directory: one training run"),
    ("steps", "the last step the stage logged: an optimizer step, or for the RL trainers one iteration of sampling "
              "and updates, for rejection sampling one round"),
    ("first loss, last loss, best loss", "the stage's training loss on its training batches, first logged, last "
     "logged and lowest. Each stage has its own objective, so the numbers do not compare across stages: next-token "
     "cross-entropy in nats per token (pretrain, sft), Bradley-Terry loss (rm), DPO loss (dpo), a policy surrogate "
     "with no unit that stays near 0 (grpo, ppo)"),
    ("held-out loss", "the same objective on the stage's own held-out data (`eval/loss`) at its last evaluation: "
     "held-out text (pretrain), held-out answers (sft), held-out pairs (rm, dpo). Not the summary's answer loss, "
     "which measures every model the same way"),
    ("task accuracy", "share of held-out task problems the stage's model answered right, where the stage measures "
     "it while training (the key is named below the table)"),
    ("preference accuracy", "share of preference pairs the stage ranks the right way by its own measure, last value "
     "(the key is named below the table): a reward model's reward (rm, `eval/accuracy`), or DPO's implicit reward "
     "beta * log(policy / reference) (`eval/rewards/accuracies`), which is relative to the reference model. "
     "It says which answer of a pair is preferred, not whether the model answers the task right"),
    ("wall time", "training time the stage logged last (`elapsed_s`)"),
    ("speed", "mean training throughput: tokens per second, or preference pairs per second (rm, dpo)"),
)


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


def _capability_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The eval/<task>/accuracy keys a stage logged (a trainer's eval section of checked tasks)."""
    keys = {key for row in rows for key in row if key.startswith("eval/") and key.endswith("/accuracy")
            and key.count("/") == 2}
    return sorted(key for key in keys if _series(rows, key)[1])


def _last(rows: list[dict[str, Any]], keys: Sequence[str]) -> tuple[float | None, str | None]:
    """The last value of the first key any row has."""
    for key in keys:
        _, values = _series(rows, key)
        if values:
            return values[-1], key
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
    task_accuracy: float | None = None
    task_accuracy_key: str | None = None
    # Pair accuracy by the stage's own measure (an rm stage's eval/accuracy, a dpo stage's eval/rewards/accuracies).
    preference_accuracy: float | None = None
    preference_accuracy_key: str | None = None
    wall_time_s: float | None = None
    tokens_per_s: float | None = None
    # Preference stages (rm, dpo) count pairs: their speed is pairs/s.
    pairs_per_s: float | None = None
    # Rows with a "model" key: evaluation results, one per evaluated model.
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def trains(self) -> bool:
        """Whether the stage logged training rows (an evaluation-only stage has only per-model rows)."""
        return self.steps is not None or self.last_loss is not None


def summarize_stage(name: str, rows: list[dict[str, Any]]) -> StageSummary:
    """First / last / best training loss, last eval loss, final task and preference accuracy, steps, wall time,
    mean tokens/s."""
    summary = StageSummary(name=name, evaluations=[row for row in rows if "model" in row])
    curve = [row for row in rows if "model" not in row]
    # Rejection sampling logs each round's fine-tuning loss as sft/loss (its rows are rounds, not steps).
    _, losses = _series(curve, "loss")
    if not losses:
        _, losses = _series(curve, "sft/loss")
    if losses:
        summary.first_loss, summary.last_loss, summary.best_loss = losses[0], losses[-1], min(losses)
    summary.eval_loss, _ = _last(curve, ("eval/loss",))
    steps = [int(row["step"]) for row in curve if _num(row.get("step")) is not None]
    if steps:
        summary.steps = max(steps)
    summary.task_accuracy, summary.task_accuracy_key = _last(curve, (*TASK_ACCURACY_KEYS, *_capability_keys(curve)))
    summary.preference_accuracy, summary.preference_accuracy_key = _last(curve, PREFERENCE_ACCURACY_KEYS)
    summary.wall_time_s, _ = _last(curve, ("elapsed_s",))
    if summary.wall_time_s is None:  # rs: the rounds' sampling and fine-tuning times (time/sample_s, time/sft_s)
        times = [value for row in curve for key, value in row.items()
                 if key.startswith("time/") and key.endswith("_s") and _num(value) is not None]
        summary.wall_time_s = sum(times) if times else None
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
    """The table of training stages (evaluation-only stages get their own table), then what its columns mean."""
    lines = [
        "| stage | steps | first loss | last loss | best loss | held-out loss | task accuracy | preference accuracy "
        "| wall time | speed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.name} | {'-' if s.steps is None else s.steps} | {_fmt(s.first_loss)} | {_fmt(s.last_loss)} | "
            f"{_fmt(s.best_loss)} | {_fmt(s.eval_loss)} | {_fmt(s.task_accuracy, '.3f')} | "
            f"{_fmt(s.preference_accuracy, '.3f')} | {_duration(s.wall_time_s)} | {_speed(s)} |"
        )
    lines += ["", "What the columns mean (\"-\": the stage did not log that number):", ""]
    lines += [f"- **{name}**: {meaning}." for name, meaning in STAGE_COLUMNS]
    for column, attribute in (("Task accuracy", "task_accuracy_key"),
                              ("Preference accuracy", "preference_accuracy_key")):
        keyed = [f"{s.name}: {getattr(s, attribute)}" for s in summaries if getattr(s, attribute) is not None]
        if keyed:
            lines += ["", f"{column} column: " + "; ".join(keyed) + "."]
    return lines


def _evaluation_keys(summary: StageSummary) -> list[str]:
    keys: list[str] = []
    for row in summary.evaluations:
        keys += [k for k, v in row.items() if k not in ("model", "step") and _num(v) is not None and k not in keys]
    return keys


def _evaluation_table(summary: StageSummary) -> list[str]:
    """One row per evaluated model, a column per metric (headers from `summary.EVALUATION_COLUMNS`), then what
    the columns mean."""
    keys = _evaluation_keys(summary)
    lines = ["| model | " + " | ".join(column_header(k) for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for row in summary.evaluations:
        cells = []
        for key in keys:
            spec = ".0f" if key.startswith("num") else ".1f" if key.endswith("_s") else ".4f"
            cells.append(_fmt(_num(row.get(key)), spec))
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines += ["", "What the columns mean (accuracies and shares are fractions from 0 to 1; \"-\": the model has no "
              "such number):", "", MODEL_COLUMN, *column_meanings(keys)]
    return lines


def _examples(path: Path, per_model: int = 3) -> list[str]:
    """The first `per_model` generations of every model in `examples.jsonl`, one block per model."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in read_metrics(path):
        by_model.setdefault(str(row.get("model", "")), []).append(row)
    lines = ["Greedy answers to the first held-out problems, a few per model; `ok` / `WRONG`: the task's checker "
             "accepted the answer or not, `expected`: the reference answer.", ""]
    for model, rows in by_model.items():
        if model:
            lines.append(f"**{model}**")
            lines.append("")
        lines.append("```")
        for row in rows[:per_model]:
            lines.append(f"{'ok   ' if row.get('correct') else 'WRONG'} {row.get('prompt', '')}")
            expected = f"   (expected {row['reference']})" if "reference" in row else ""
            lines.append(f"      -> {row.get('completion', '')!r}{expected}")
        lines += ["```", ""]
    return lines


def _new_figure(panels: int, *, width: float = 5.0, height: float = 3.6, rows: int = 1) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = math.ceil(panels / rows)
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plain_numbers(ax: Axes, *, steps: bool = True) -> None:
    """Tick labels as plain numbers: no offset ("1e-5 + 5.696") and no scientific notation, which make a
    near-constant series unreadable; whole steps on the x axis."""
    from matplotlib.ticker import MaxNLocator

    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    if steps:
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        low, high = ax.get_xlim()
        if high - low < 2:  # one logged step: widen to whole steps either side, or the ticks are fractions
            middle = (low + high) / 2
            ax.set_xlim(middle - 1, middle + 1)


def loss_figure(stages: dict[str, list[dict[str, Any]]], trainers: dict[str, str] | None = None) -> Figure | None:
    """Training (and held-out) loss against the step, a panel per stage with a loss curve, at most three a row;
    the y label gives the loss's unit by the stage's trainer (`LOSS_UNITS`)."""
    curves = {name: rows for name, rows in stages.items() if _series(rows, "loss")[1]}
    if not curves:
        return None
    columns = min(3, len(curves))
    grid_rows = math.ceil(len(curves) / columns)
    fig = _new_figure(columns * grid_rows, rows=grid_rows)
    for i, (name, rows) in enumerate(curves.items()):
        ax = fig.add_subplot(grid_rows, columns, i + 1)
        steps, losses = _series(rows, "loss")
        ax.plot(steps, losses, "o-" if len(losses) < 3 else "-", label="train loss", linewidth=1.2, markersize=3)
        eval_steps, eval_values = _series(rows, "eval/loss")
        if eval_values:
            ax.plot(eval_steps, eval_values, "o-", label="held-out loss", markersize=4)
        trainer = (trainers or {}).get(name, name)
        ax.set_title(name)
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(f"loss ({LOSS_UNITS.get(trainer, 'surrogate objective, no unit')})")
        _plain_numbers(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def accuracy_figure(summaries: list[StageSummary]) -> Figure | None:
    """Grouped bars per evaluated model (task and preference accuracy) when a stage evaluated models; otherwise
    one bar per stage with a task accuracy."""
    evaluations = [row for s in summaries for row in s.evaluations]
    groups: list[str] = []
    series: list[tuple[str, list[float | None]]] = []
    if evaluations:
        groups = [str(row["model"]) for row in evaluations]
        for key, label in EVALUATION_BARS:
            values = [_num(row.get(key)) for row in evaluations]
            if any(v is not None for v in values):
                series.append((label, values))
        xlabel = "evaluated model"
    else:
        groups = [s.name for s in summaries if s.task_accuracy is not None]
        series.append(("task accuracy", [s.task_accuracy for s in summaries if s.task_accuracy is not None]))
        xlabel = "stage"
    if not groups or not series or all(v is None for _, values in series for v in values):
        return None
    fig = _new_figure(1, width=max(4.0, 0.6 + len(groups) * (0.5 + 0.6 * len(series))))
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
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ACCURACY_LABEL)
    _plain_numbers(ax, steps=False)
    ax.set_title("final accuracy")
    if len(series) > 1:
        ax.legend(loc="upper left", fontsize=8)
    return fig


def curves_figure(stages: dict[str, list[dict[str, Any]]], keys: tuple[str, ...], what: str) -> Figure | None:
    """The `keys` series of every stage that logs any of them against the step, a panel per stage; the y label
    names each plotted key's quantity and unit (`CURVE_LABELS`)."""
    drawn = {name: rows for name, rows in stages.items() if any(_series(rows, k)[1] for k in keys)}
    if not drawn:
        return None
    fig = _new_figure(len(drawn))
    for i, (name, rows) in enumerate(drawn.items()):
        ax = fig.add_subplot(1, len(drawn), i + 1)
        labels: list[str] = []
        for key in keys:
            steps, values = _series(rows, key)
            if values:
                marker = "o-" if key.startswith("eval/") or len(values) < 3 else "-"  # one point needs a marker
                ax.plot(steps, values, marker, label=key, markersize=3)
                label = CURVE_LABELS.get(key, key)
                labels += [label] if label not in labels else []
        ax.set_title(f"{name}: {what}")
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel("\n".join(labels))
        _plain_numbers(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def forgetting_figure(stages: dict[str, list[dict[str, Any]]]) -> Figure | None:
    """Per stage that logs them: eval/ptx_loss (left axis) and eval/<task>/accuracy (right axis) against the step."""
    monitored = {name: rows for name, rows in stages.items()
                 if _series(rows, FORGETTING_LOSS)[1] or _capability_keys(rows)}
    if not monitored:
        return None
    # One loss scale for every panel, from 0: stages with and without PTX compare at a glance.
    top = max((v for rows in monitored.values() for v in _series(rows, FORGETTING_LOSS)[1]), default=1.0)
    fig = _new_figure(len(monitored))
    for i, (name, rows) in enumerate(monitored.items()):
        ax = fig.add_subplot(1, len(monitored), i + 1)
        handles = []
        steps, values = _series(rows, FORGETTING_LOSS)
        if values:
            handles += ax.plot(steps, values, "o-", color="tab:red", label=FORGETTING_LOSS, markersize=3)
            ax.set_ylim(0, top * 1.05)
        ax.set_ylabel("held-out LM loss on pretraining text\n(nats per token)")
        accuracy_ax = ax.twinx()
        for key in _capability_keys(rows):
            handles += accuracy_ax.plot(*_series(rows, key), "s--", label=key, markersize=3)
        accuracy_ax.set_ylim(0, 1.05)
        accuracy_ax.set_ylabel(ACCURACY_LABEL)
        _plain_numbers(accuracy_ax, steps=False)
        ax.set_title(f"{name}: forgetting monitor")
        ax.set_xlabel(STEP_LABEL)
        _plain_numbers(ax)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=8)
    return fig


def report_figures(stages: dict[str, list[dict[str, Any]]], summaries: list[StageSummary],
                   trainers: dict[str, str] | None = None) -> dict[str, Figure]:
    """Every plot the data allows, by file name: `loss.png`, `accuracy.png`, then DPO-family stages' log-probs of
    chosen and rejected answers (`logps.png`) and their change from the reference (`logps_delta.png`), RL stages'
    mean reward (`reward.png`), KL to the reference and entropy (`kl.png`), and the forgetting monitor
    (`forgetting.png`). `trainers`: each stage's trainer, for the loss's unit (default: the stage's name)."""
    built: dict[str, Figure | None] = {
        "loss.png": loss_figure(stages, trainers),
        "accuracy.png": accuracy_figure(summaries),
        "logps.png": curves_figure(stages, LOGPS_KEYS, "log-probs"),
        "logps_delta.png": curves_figure(stages, DELTA_KEYS, "log-prob - reference"),
        "reward.png": curves_figure(stages, REWARD_KEYS, "mean reward"),
        "kl.png": curves_figure(stages, DRIFT_KEYS, "KL to the reference, entropy"),
        "forgetting.png": forgetting_figure(stages),
    }
    return {name: fig for name, fig in built.items() if fig is not None}


def _trainer(stage_dir: Path) -> str:
    """The trainer that wrote a stage folder (run.json's "stage"), else the folder's name."""
    run = stage_dir / "run.json"
    if run.is_file():
        stage = json.loads(run.read_text()).get("stage")
        if isinstance(stage, str):
            return stage
    return stage_dir.name


def _exported_model(stage_dir: Path) -> Path | None:
    """The stage's exported HF model folder (the one `alignkit.load` picks for the stage folder), if any."""
    from alignkit.checkpoint import RUN_MODEL_DIRS

    return next((stage_dir / sub for sub in RUN_MODEL_DIRS if (stage_dir / sub / "config.json").is_file()), None)


def try_it_commands(run_dir: Path, names: Sequence[str], *, prompt: str, response: str) -> list[tuple[str, str]]:
    """(stage, command) for every stage with an exported model: `alignkit score` for a reward model (a
    `...ForSequenceClassification` config), `alignkit generate --prompt` for a pretrained model (it never saw the
    chat template), `alignkit generate --chat` for the others. The commands name the stage folder, which
    `--model` resolves to its final model."""
    commands = []
    for name in names:
        stage_dir = run_dir / name
        exported = _exported_model(stage_dir)
        if exported is None:
            continue
        architectures = json.loads((exported / "config.json").read_text()).get("architectures") or []
        model = shlex.quote(str(stage_dir))
        if any(str(a).endswith("ForSequenceClassification") for a in architectures):
            command = (f"alignkit score --model {model} --prompt {shlex.quote(prompt)} "
                       f"--response {shlex.quote(response)}")
        else:
            flag = "--prompt" if _trainer(stage_dir) == "pretrain" else "--chat"
            command = f"alignkit generate --model {model} {flag} {shlex.quote(prompt)} --max-new-tokens 32"
        commands.append((name, command))
    return commands


def _try_it(commands: list[tuple[str, str]]) -> list[str]:
    lines = ["## Try the models", "",
             "Each stage folder holds its final model (`final/`); `--model` takes the stage folder. Reward models "
             "print the reward of a response with `alignkit score`; the pretrained model continues plain text "
             "(`--prompt`); the chat models answer a user message (`--chat`). Add `--temperature 1 --n 4` to "
             "sample several answers.", ""]
    for name, command in commands:
        lines += [f"{name}:", "", "```bash", command, "```", ""]
    return lines


def _first_example_prompt(run_dir: Path, names: Sequence[str]) -> str | None:
    for name in names:
        path = run_dir / name / "examples.jsonl"
        if path.is_file():
            rows = read_metrics(path)
            if rows and rows[0].get("prompt"):
                return str(rows[0]["prompt"])
    return None


def build_report(run_dir: str | Path, *, stages: list[str] | None = None, title: str | None = None,
                 summary: Sequence[str] = (), try_prompt: str | None = None, try_response: str | None = None
                 ) -> Path:
    """Write `run_dir/report.md` (and `loss.png`, `accuracy.png`, `logps.png`, `reward.png`, ... when there is data)
    and return its path.

    `stages` picks and orders the stage folders; by default the order of `pipeline.json`, else alphabetical.
    `summary`: markdown lines placed before the stage table (a pipeline's headline numbers). `try_prompt` /
    `try_response`: the user message and answer of the closing "try the models" commands (default: the first
    sample generation's prompt, and a stand-in answer).
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
    training = [s for s in summaries if s.trains]
    lines += _stage_table(training) if training else ["No stage logged training metrics."]
    lines.append("")
    for s in summaries:
        if s.evaluations:
            lines += [f"## Evaluation ({s.name})", "", *_evaluation_table(s), ""]
        examples = run_dir / s.name / "examples.jsonl"
        if examples.is_file():
            lines += [f"### Sample generations ({s.name})", "", *_examples(examples)]

    lines += ["## Plots", ""]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        lines.append("Plots skipped: matplotlib is not installed (`pip install matplotlib`, or `pip install alignkit[extras]`).")
    else:
        trainers = {name: _trainer(run_dir / name) for name in rows_by_stage}
        figures = report_figures(rows_by_stage, summaries, trainers)
        for filename, fig in figures.items():
            fig.savefig(run_dir / filename, dpi=100)
        lines += [f"![{Path(name).stem}]({name})" for name in figures] or ["No curves to plot."]
    lines.append("")
    prompt = try_prompt or _first_example_prompt(run_dir, names) or "Hello! What can you do?"
    commands = try_it_commands(run_dir, names, prompt=prompt, response=try_response or "I can answer questions.")
    if commands:
        lines += _try_it(commands)
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
