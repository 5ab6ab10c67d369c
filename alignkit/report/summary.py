"""The tables that compare evaluated models: the summary printed at the end of a pipeline and the first section
of its report. Rows are `alignkit.eval.task` evaluation rows by model name.

`EVALUATION_COLUMNS` names and defines every key of those rows once; the summary table, the report's evaluation
table and the "what the columns mean" lists under them all read it.
"""

from __future__ import annotations

from typing import Any

# Evaluation row key -> (column header, what the number is). The held-out answer loss is "answer loss", never
# "eval loss": a stage's own held-out loss (the report's stage table) is a different number.
EVALUATION_COLUMNS: dict[str, tuple[str, str]] = {
    "accuracy/heldout": (
        "held-out acc", "share of the held-out problems (operand pairs no training file contains) answered right, "
        "greedy decoding, asked through the chat template"),
    "accuracy/heldout_sampled": (
        "sampled acc", "accuracy on the same held-out problems with answers sampled at temperature 1, several per "
        "problem: a mistake the model makes some of the time counts here even when greedy decoding avoids it"),
    "wrong_operation/heldout": (
        "wrong-op", "share of the greedy held-out answers that applied another operation to the problem's numbers "
        "(the sloppy annotator's mistake in the SFT data)"),
    "wrong_operation/heldout_sampled": (
        "sampled wrong-op", "share of the sampled held-out answers (temperature 1) that applied another operation "
        "to the problem's numbers"),
    "accuracy/train_pairs": (
        "train-pair acc", "greedy accuracy on training operand pairs in new wordings: what was learnt, not how it "
        "generalises"),
    "accuracy/heldout_plain_text": (
        "plain-text acc", "greedy accuracy on the held-out problems asked as plain text, without the chat template "
        "(the form pretraining saw)"),
    "accuracy/preference_heldout": (
        "pref acc", "preference accuracy: share of the held-out pairs (a correct solution and a wrong one) where a "
        "language model's own summed log-prob of the correct one is higher (no reference model), or where a reward "
        "model rewards it higher; not task accuracy"),
    "preference/logp_margin": (
        "log-prob margin", "mean over the held-out pairs of the summed log-prob of the correct solution minus the "
        "wrong one, in nats"),
    "preference/reward_margin": (
        "reward margin", "a reward model's mean reward of the correct solution minus the wrong one on the held-out "
        "pairs"),
    "eval/loss": (
        "answer loss", "mean next-token loss of the held-out reference answers (assistant tokens only, through the "
        "chat template), in nats per token; the same measure for every model, unlike a stage's own held-out loss"),
    "eval/perplexity": ("answer perplexity", "exp(answer loss)"),
    "num_problems": ("problems", "number of held-out problems asked"),
    "num_pairs": ("pairs", "number of held-out preference pairs scored"),
    "eval_s": ("eval time (s)", "seconds this model's evaluation took"),
}
# The first column of both tables, in words.
MODEL_COLUMN = "- **model**: the stage whose final model was evaluated (a reward model has only pair numbers)."
# The summary table's columns, in order; a model without a value (a reward model has no task accuracy) gets "-".
SUMMARY_KEYS = ("accuracy/heldout", "accuracy/heldout_sampled", "wrong_operation/heldout_sampled",
                "accuracy/train_pairs", "accuracy/heldout_plain_text", "accuracy/preference_heldout", "eval/loss")
SUMMARY_COLUMNS = tuple((key, EVALUATION_COLUMNS[key][0]) for key in SUMMARY_KEYS)
# What `comparison` reports, as (row key, words).
COMPARED = (
    ("accuracy/heldout", "held-out task accuracy"),
    ("accuracy/heldout_sampled", "held-out task accuracy, sampled at temperature 1"),
    ("wrong_operation/heldout_sampled", "share of sampled held-out answers with a wrong operation"),
    ("accuracy/preference_heldout", "held-out preference accuracy"),
    ("preference/logp_margin", "held-out log-prob margin, chosen - rejected"),
)


def column_header(key: str) -> str:
    """The header of an evaluation row key: its short name, or the key itself when it has none."""
    return EVALUATION_COLUMNS[key][0] if key in EVALUATION_COLUMNS else key


def column_meanings(keys: list[str] | tuple[str, ...]) -> list[str]:
    """The markdown list that defines each column: "- **header** (`key`): meaning"."""
    lines = []
    for key in keys:
        header, meaning = EVALUATION_COLUMNS.get(key, (key, "logged by the stage; no description is registered"))
        lines.append(f"- **{header}** (`{key}`): {meaning}." if header != key else f"- **`{key}`**: {meaning}.")
    return lines


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
    """The report's first section (markdown lines): every evaluated model's held-out numbers side by side, what
    each column means, and the two compared models in words."""
    lines = ["## Summary", "", "| model | " + " | ".join(header for _, header in SUMMARY_COLUMNS) + " |",
             "|---|" + "---:|" * len(SUMMARY_COLUMNS)]
    for name, row in rows.items():
        cells = [f"{row[key]:.3f}" if row.get(key) is not None else "-" for key, _ in SUMMARY_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "What the columns mean (accuracies and shares are fractions from 0 to 1; "
              "\"-\": the model has no such number):", "", MODEL_COLUMN, *column_meanings(SUMMARY_KEYS), ""]
    compared = comparison(rows, *compare)
    if compared:
        lines += [f"{compare[0]} against {compare[1]}:", "", *[f"- {line}" for line in compared], ""]
    return lines
