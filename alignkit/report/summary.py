"""The tables that compare evaluated models: the summary printed at the end of a pipeline and the first section
of its report. Rows are `alignkit.eval.task` evaluation rows by model name."""

from __future__ import annotations

from typing import Any

# (row key, column header) of the summary table; a model without a value (a reward model has no task accuracy) gets "-".
SUMMARY_COLUMNS = (
    ("accuracy/heldout", "held-out acc"),
    ("accuracy/heldout_sampled", "sampled acc"),
    ("wrong_operation/heldout_sampled", "sampled wrong-op"),
    ("accuracy/train_pairs", "train-pair acc"),
    ("accuracy/heldout_plain_text", "plain-text acc"),
    ("accuracy/preference_heldout", "pref acc"),
    ("eval/loss", "eval loss"),
)
# What `comparison` reports, as (row key, words).
COMPARED = (
    ("accuracy/heldout", "held-out task accuracy"),
    ("accuracy/heldout_sampled", "held-out task accuracy, sampled at temperature 1"),
    ("wrong_operation/heldout_sampled", "share of sampled held-out answers with a wrong operation"),
    ("accuracy/preference_heldout", "held-out preference accuracy"),
    ("preference/logp_margin", "held-out log-prob margin, chosen - rejected"),
)
EXPLANATION = (
    "held-out acc: greedy answers to held-out problems through the chat template; sampled acc: the same problems, "
    "answers sampled at temperature 1 (a mistake the model makes some of the time counts here even when greedy "
    "decoding avoids it); sampled wrong-op: the share of those sampled answers that applied another operation to "
    "the problem's numbers (the sloppy annotator's mistake); train-pair acc: training operand pairs in new "
    "wordings; pref acc: held-out pairs (a "
    "correct solution and a wrong one) where the model's summed log-prob of the correct one is higher, or for a "
    "reward model its reward."
)


def comparison(rows: dict[str, dict[str, Any]], baseline: str, candidate: str) -> list[str]:
    """One line per compared metric, "<metric>: <baseline> <value> -> <candidate> <value> (<difference>)"; empty
    when either model was not evaluated."""
    if baseline not in rows or candidate not in rows:
        return []
    lines = []
    for key, words in COMPARED:
        before, after = rows[baseline].get(key), rows[candidate].get(key)
        if before is not None and after is not None:
            lines.append(f"{words}: {baseline} {before:.3f} -> {candidate} {after:.3f} ({after - before:+.3f})")
    return lines


def summary_table(rows: dict[str, dict[str, Any]] | None, *, compare: tuple[str, str],
                  seconds: dict[str, float]) -> str:
    """The short table printed at the end: each evaluated model's accuracies and loss, the comparison of the two
    `compare` models, then stage times."""
    lines = []
    if rows is not None:
        lines.append(f"{'model':<10}" + "".join(f" {header:>14}" for _, header in SUMMARY_COLUMNS))
        for name, row in rows.items():
            cells = [f"{row[key]:>14.3f}" if row.get(key) is not None else f"{'-':>14}" for key, _ in SUMMARY_COLUMNS]
            lines.append(f"{name:<10} " + " ".join(cells))
        lines += comparison(rows, *compare)
    total = sum(seconds.values())
    lines.append("time: " + ", ".join(f"{n} {s:.0f}s" for n, s in seconds.items()) + f"; total {total:.0f}s")
    return "\n".join(lines)


def summary_section(rows: dict[str, dict[str, Any]], *, compare: tuple[str, str]) -> list[str]:
    """The report's first section (markdown lines): every evaluated model's held-out numbers side by side, and the
    two compared models in words."""
    lines = ["## Summary", "", "| model | " + " | ".join(header for _, header in SUMMARY_COLUMNS) + " |",
             "|---|" + "---:|" * len(SUMMARY_COLUMNS)]
    for name, row in rows.items():
        cells = [f"{row[key]:.3f}" if row.get(key) is not None else "-" for key, _ in SUMMARY_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", EXPLANATION, ""]
    compared = comparison(rows, *compare)
    lines += [f"- {line}" for line in compared]
    return [*lines, ""] if compared else lines
