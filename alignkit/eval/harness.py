"""Few-shot evaluation of one model on several tasks and shot counts, and what it writes.

```python
tasks = [load_task("arc_easy"), load_task("path/to/my_task.jsonl")]
results = evaluate_tasks(model, tokenizer, tasks, shots=[0, 1, 5], limit=200)
write_outputs(results, "runs/eval/smollm2", meta={"model": "smollm2-135m-instruct"})
```

Every shot count of a task scores the same records (those after the shot pool), so the points of an in-context
learning curve differ only in the number of examples in the prompt.

Tasks of a group (MMLU's subjects, `alignkit.eval.mmlu`) also get the group's result at each shot count
(`with_group_results`): `acc`, the macro average over its tasks, and `acc_micro`, the average over all their items
(lm-evaluation-harness's size-weighted group score).

Outputs: `results.json` (every task, shot count, metric, standard error and n), `samples_<task>_<k>shot.jsonl`
(one record per item: prompt, choices, log-likelihoods, prediction, gold), `results.md` (the markdown table) and
`icl.png` (accuracy against shots, one line per task, a group's line instead of its tasks'; when matplotlib is
installed).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.errors import ConfigError
from alignkit.eval.loglikelihood import encode_pairs, score_requests
from alignkit.eval.metrics import (
    choice_predictions,
    macro_mean_stderr,
    mean_stderr,
    perplexity,
    pooled_stderr,
)
from alignkit.eval.tasks import Doc, Task, build_requests, fewshot_prefix

if TYPE_CHECKING:
    from alignkit.model import LlamaForCausalLM
    from alignkit.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class TaskResult:
    """One task at one shot count: metric -> value, metric_stderr -> its standard error, and the samples.

    A group's result (`group_results`) lists its tasks in `subtasks` and has no samples of its own.
    """

    task: str
    shots: int
    num_items: int
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)
    elapsed_s: float = 0.0
    group: str | None = None  # the group this task is averaged into ("mmlu" for an MMLU subject)
    subtasks: list[str] = field(default_factory=list)  # a group's tasks

    @property
    def metric_names(self) -> list[str]:
        return [k for k in self.metrics if not k.endswith("_stderr")]


def check_shots(shots: Sequence[int]) -> list[int]:
    """Shot counts sorted, without repeats; a ConfigError for a negative count or none at all."""
    if not shots:
        raise ConfigError("give at least one shot count (e.g. 0 or 0,1,5).")
    if any(k < 0 for k in shots):
        raise ConfigError(f"shot counts must be 0 or more; got {list(shots)}.")
    return sorted(set(shots))


def prepare(task: Task, shots: Sequence[int], *, shot_pool: int | None = None, limit: int | None = None
            ) -> tuple[list[Doc], list[Doc]]:
    """(shot pool, scored records) of `task` for these shot counts; every error about them, before any scoring.

    The pool is the first `shot_pool` records (default: the largest shot count); the scored records are the
    next `limit` (default: all the rest). A task with a few-shot split of its own (MMLU) takes its pool from that
    split, whatever `shot_pool` is, and scores the first `limit` of all its records.
    """
    pool_size = max(shots) if shot_pool is None else shot_pool
    pool, docs = task.split(pool_size)
    for k in shots:
        if task.fewshot_docs is not None and k > len(pool):
            raise ConfigError(f"{task.name}: {k} shots need {k} examples, but its few-shot file {task.fewshot_path} "
                              f"holds {len(pool)}; ask for at most {len(pool)} shots.")
        fewshot_prefix(pool, k)  # raises when the pool is too small for k
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be at least 1; got {limit}.")
        docs = docs[:limit]
    return pool, docs


def evaluate_task(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    task: Task,
    shots: Sequence[int],
    *,
    shot_pool: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    max_batch_tokens: int = 16384,
) -> list[TaskResult]:
    """One result per shot count of `task` (see `prepare` for the shot pool and `limit`)."""
    shots = check_shots(shots)
    pool, docs = prepare(task, shots, shot_pool=shot_pool, limit=limit)
    results = []
    for k in shots:
        start = time.perf_counter()
        # Every item starts with the same description and shots: the scorer computes that prefix once.
        prefix = task.description + fewshot_prefix(pool, k)
        pairs = [build_requests(doc, prefix) for doc in docs]
        flat = encode_pairs(tokenizer, [p for item in pairs for p in item])
        requests, offset = [], 0
        for item in pairs:
            requests.append(flat[offset : offset + len(item)])
            offset += len(item)
        scores = score_requests(model, requests, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
        if task.layout == "continuation":
            result = _continuation_result(task, k, docs, pairs, scores)
        else:
            result = _choice_result(task, k, docs, pairs, scores)
        result.elapsed_s = time.perf_counter() - start
        result.group = task.group
        summary = ", ".join(f"{m} {result.metrics[m]:.4f}" for m in result.metric_names)
        logger.info(f"{task.name} {k}-shot: {summary} (n={result.num_items}, {result.elapsed_s:.1f}s)")
        results.append(result)
    return results


def reported_metrics(task: Task) -> tuple[str, ...]:
    """The metrics `evaluate_task` reports for a task, whatever its records: LAMBADA's acc and perplexity, acc
    and acc_norm for the `choices` layout (acc alone where the task turns acc_norm off), acc for `partial`."""
    if task.layout == "continuation":
        return ("acc", "perplexity")
    return ("acc", "acc_norm") if task.layout == "choices" and task.acc_norm else ("acc",)


def _choice_result(task: Task, k: int, docs: list[Doc], pairs: list[list[tuple[str, str]]],
                   scores: list[list[Any]]) -> TaskResult:
    """acc (and acc_norm for the `choices` layout; with `partial` every option scores the same continuation,
    so lm-evaluation-harness reports acc alone) with their standard errors."""
    acc, acc_norm, samples = [], [], []
    for doc, item, item_scores in zip(docs, pairs, scores):
        lls = [s.logprob for s in item_scores]
        pred, pred_norm = choice_predictions(lls, doc.continuations)
        acc.append(float(pred == doc.gold))
        sample: dict[str, Any] = {
            "index": doc.index, "line": doc.line,
            "prompt": item[0][0] if task.layout == "choices" else [context for context, _ in item],
            "choices": list(doc.continuations) if task.layout == "choices" else list(doc.contexts),
            **({"continuation": doc.continuations[0]} if task.layout == "partial" else {}),
            "loglikelihoods": lls, "num_tokens": [s.num_tokens for s in item_scores],
            "is_greedy": [s.is_greedy for s in item_scores],
            "prediction": pred, "gold": doc.gold, "acc": acc[-1],
        }
        if "acc_norm" in reported_metrics(task):
            acc_norm.append(float(pred_norm == doc.gold))
            sample.update(prediction_norm=pred_norm, acc_norm=acc_norm[-1])
        samples.append(sample)
    metrics: dict[str, float] = {}
    for name, values in (("acc", acc), ("acc_norm", acc_norm)):
        if values:
            metrics[name], metrics[f"{name}_stderr"] = mean_stderr(values)
    return TaskResult(task.name, k, len(docs), metrics, samples)


def _continuation_result(task: Task, k: int, docs: list[Doc], pairs: list[list[tuple[str, str]]],
                         scores: list[list[Any]]) -> TaskResult:
    """LAMBADA's metrics: acc (the continuation is the greedy one) and perplexity."""
    greedy, lls, samples = [], [], []
    for doc, item, item_scores in zip(docs, pairs, scores):
        score = item_scores[0]
        greedy.append(float(score.is_greedy))
        lls.append(score.logprob)
        samples.append({
            "index": doc.index, "line": doc.line, "prompt": item[0][0], "continuation": doc.continuations[0],
            "loglikelihood": score.logprob, "num_tokens": score.num_tokens, "is_greedy": score.is_greedy,
            "acc": greedy[-1],
        })
    metrics: dict[str, float] = {}
    metrics["acc"], metrics["acc_stderr"] = mean_stderr(greedy)
    metrics["perplexity"], metrics["perplexity_stderr"] = perplexity(lls)
    return TaskResult(task.name, k, len(docs), metrics, samples)


def evaluate_tasks(model: LlamaForCausalLM, tokenizer: Tokenizer, tasks: Sequence[Task], shots: Sequence[int],
                   **kwargs: Any) -> list[TaskResult]:
    """`evaluate_task` for each task, in order (keyword arguments as there), and the groups' results
    (`with_group_results`)."""
    return with_group_results(
        [result for task in tasks for result in evaluate_task(model, tokenizer, task, shots, **kwargs)])


def group_results(results: Sequence[TaskResult]) -> list[TaskResult]:
    """One result per group and shot count that has two or more tasks among `results`:

    - `acc`: the macro average, the mean of the tasks' accuracies (each task weighs the same), with the standard
      error of a mean of independent means;
    - `acc_micro`: the mean over all the tasks' items (each item weighs the same; lm-evaluation-harness's `mmlu`
      score, `weight_by_size: True`), with lm-evaluation-harness's pooled standard error.
    """
    members: dict[tuple[str, int], list[TaskResult]] = {}
    for r in results:
        if r.group is not None and not r.subtasks:
            members.setdefault((r.group, r.shots), []).append(r)
    out = []
    for (group, k), rs in members.items():
        if len(rs) < 2:
            continue
        accs = [r.metrics["acc"] for r in rs]
        errors = [r.metrics.get("acc_stderr", math.nan) for r in rs]
        sizes = [r.num_items for r in rs]
        metrics: dict[str, float] = {}
        metrics["acc"], metrics["acc_stderr"] = macro_mean_stderr(accs, errors)
        metrics["acc_micro"] = sum(a * n for a, n in zip(accs, sizes)) / sum(sizes)
        metrics["acc_micro_stderr"] = pooled_stderr(errors, sizes)
        out.append(TaskResult(group, k, sum(sizes), metrics, elapsed_s=sum(r.elapsed_s for r in rs),
                              subtasks=[r.task for r in rs]))
    return out


def with_group_results(results: Sequence[TaskResult]) -> list[TaskResult]:
    """`results` with each group's results (`group_results`) just before its first task's, each logged."""
    groups: dict[str, list[TaskResult]] = {}
    for g in group_results(results):
        summary = ", ".join(f"{m} {g.metrics[m]:.4f}" for m in g.metric_names)
        logger.info(f"{g.task} {g.shots}-shot, {len(g.subtasks)} tasks: {summary} (n={g.num_items})")
        groups.setdefault(g.task, []).append(g)
    ordered: list[TaskResult] = []
    for r in results:
        if r.group in groups:
            ordered += groups.pop(r.group)
        ordered.append(r)
    return ordered


# ------------------------------------------------------------------------------------------------ outputs


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


def results_json(results: Sequence[TaskResult], meta: dict[str, Any]) -> dict[str, Any]:
    """{**meta, "results": {task: {"<k>": {metric: value, metric_stderr: error, "n": items, "elapsed_s"}}}}."""
    tasks: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {}
    for r in results:
        tasks.setdefault(r.task, {})[str(r.shots)] = {
            **{name: _json_number(value) for name, value in r.metrics.items()},
            "n": r.num_items, "elapsed_s": round(r.elapsed_s, 3),
            **({"num_tasks": len(r.subtasks)} if r.subtasks else {}),
        }
        if r.subtasks:
            groups[r.task] = r.subtasks
    # A group's tasks: {"mmlu": ["mmlu_abstract_algebra", ...]}.
    return {**meta, **({"groups": groups} if groups else {}), "results": tasks}


def markdown_table(results: Sequence[TaskResult]) -> str:
    """One row per task and metric, one column per shot count: `value ± stderr`; a group's rows say how many
    tasks it averages, and a note under the table says what its `acc` and `acc_micro` are."""
    shots = sorted({r.shots for r in results})
    by_key = {(r.task, r.shots): r for r in results}
    tasks = list(dict.fromkeys(r.task for r in results))
    lines = ["| task | metric | " + " | ".join(f"{k}-shot" for k in shots) + " | n |",
             "|---|---|" + "---:|" * len(shots) + "---:|"]
    for task in tasks:
        first = next(r for r in results if r.task == task)
        for metric in first.metric_names:
            cells = []
            for k in shots:
                r = by_key.get((task, k))
                if r is None or metric not in r.metrics:
                    cells.append("")
                    continue
                value, err = r.metrics[metric], r.metrics.get(f"{metric}_stderr", math.nan)
                cells.append(f"{value:.4f}" + ("" if math.isnan(err) else f" ± {err:.4f}"))
            label = f"{task} ({len(first.subtasks)} tasks)" if first.subtasks else task
            lines.append(f"| {label} | {metric} | " + " | ".join(cells) + f" | {first.num_items} |")
    if any(r.subtasks for r in results):
        lines += ["", "A group's `acc` is the macro average over its tasks (each task weighs the same); `acc_micro` "
                  "is the mean over all their items (lm-evaluation-harness's group score)."]
    return "\n".join(lines) + "\n"


def icl_plot(results: Sequence[TaskResult], path: Path, *, metric: str = "acc", title: str | None = None) -> bool:
    """Accuracy against the number of shots, one line per task with ±1 standard error bars; False (and no
    file) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # A group's line stands for its tasks (57 MMLU subjects would be unreadable).
    grouped = {r.task for r in results if any(g.task == r.group and g.subtasks for g in results)}
    for task in dict.fromkeys(r.task for r in results if r.task not in grouped):
        # A sampled generative task has no `acc` (greedy); its pass@1 is the accuracy of one sample.
        name = metric if any(metric in r.metrics for r in results if r.task == task) else "pass@1"
        points = sorted((r.shots, r.metrics[name], r.metrics.get(f"{name}_stderr", math.nan))
                        for r in results if r.task == task and name in r.metrics)
        if points:
            xs, ys, errs = zip(*points)
            ax.errorbar(xs, ys, yerr=[0 if math.isnan(e) else e for e in errs], marker="o", capsize=3,
                        label=task if name == metric else f"{task} ({name})")
    shots = sorted({r.shots for r in results})
    ax.set_xticks(shots)
    ax.set_xlabel("shots in the prompt")
    ax.set_ylabel(metric)
    ax.set_title(title or f"few-shot {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def sample_file_name(task: str, shots: int) -> str:
    return f"samples_{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}_{shots}shot.jsonl"


def write_outputs(results: Sequence[TaskResult], out_dir: str | Path, *, meta: dict[str, Any]) -> dict[str, Path]:
    """Write results.json, results.md, the samples files and icl.png into `out_dir`; returns what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"results.json": out / "results.json", "results.md": out / "results.md"}
    written["results.json"].write_text(json.dumps(results_json(results, meta), indent=2) + "\n")
    title = f"# Few-shot evaluation: {meta['model']}\n\n" if "model" in meta else ""
    written["results.md"].write_text(title + markdown_table(results))
    for r in results:
        if r.subtasks:  # a group: its items are in its tasks' files
            continue
        path = out / sample_file_name(r.task, r.shots)
        with path.open("w") as f:
            for sample in r.samples:
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")
        written[path.name] = path
    if icl_plot(results, out / "icl.png", title=f"few-shot accuracy: {meta['model']}" if "model" in meta else None):
        written["icl.png"] = out / "icl.png"
    return written
