"""`alignkit quickstart`: the whole pipeline on the built-in arithmetic task, on a CPU, with no download.

    data -> tokenizer -> pretrain -> sft -> rm -> dpo -> evaluate -> report

One recipe (`alignkit/recipes/quickstart.yaml`) drives every stage; each stage is a function in `STAGES` that reads
its section of the recipe and what earlier stages produced (`StageContext.results`), and writes into its own folder
of the run directory. A later stage (ppo, grpo, rejection_sampling) is one more function here and one more entry
in the recipe's `stages` list; nothing else changes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from alignkit.errors import ConfigError
from alignkit.tasks import arithmetic

PACKAGED_RECIPE = "quickstart.yaml"


@dataclass
class StageResult:
    """What a stage leaves for later ones: named paths (model_dir, tokenizer_dir, ...) and headline numbers."""

    paths: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class StageContext:
    """Everything a stage function sees: the run directory, the whole recipe, and earlier stages' results."""

    run_dir: Path
    recipe: dict[str, Any]
    results: dict[str, StageResult]
    name: str = ""

    @property
    def section(self) -> dict[str, Any]:
        """This stage's section of the recipe (empty when the recipe has none)."""
        return copy.deepcopy(self.recipe.get(self.name) or {})

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def seed(self) -> int:
        return int(self.recipe.get("seed", 0))

    def require(self, stage: str, path: str) -> Path:
        """A path an earlier stage produced; a ConfigError naming both stages when that stage did not run."""
        if stage not in self.results or path not in self.results[stage].paths:
            raise ConfigError(
                f"stage {self.name!r} needs the {path} of stage {stage!r}; put {stage!r} before {self.name!r} "
                "in the recipe's `stages` list."
            )
        return self.results[stage].paths[path]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# ------------------------------------------------------------------------------------------------ the stages


def stage_data(ctx: StageContext) -> StageResult:
    """Generate the task's data files: pretraining text, SFT chat records, preference pairs, held-out problems."""
    s = ctx.section
    difficulty = int(s.get("difficulty", 1))
    seed = ctx.seed
    # Distinct seeds per use, and every training file drawn from the "train" operand pairs only. Seed offsets:
    # 1 pretraining text, 2 SFT, 3 held-out problems, 4 training pairs in new wordings (evaluate), 5 preference
    # pairs for rm / dpo, 6 held-out preference pairs.
    pretrain = arithmetic.make_problems(int(s.get("pretrain_problems", 20000)), seed * 10 + 1, difficulty)
    sft = arithmetic.make_problems(int(s.get("sft_problems", 5000)), seed * 10 + 2, difficulty)
    heldout = arithmetic.make_problems(int(s.get("eval_problems", 200)), seed * 10 + 3, difficulty, split="heldout")
    preference = arithmetic.make_problems(int(s.get("preference_problems", 2000)), seed * 10 + 5, difficulty)
    preference_heldout = arithmetic.make_problems(int(s.get("preference_eval_problems", 300)), seed * 10 + 6,
                                                  difficulty, split="heldout")
    out = ctx.stage_dir
    paths = {
        "pretrain_text": out / "pretrain.jsonl",
        "sft_train": out / "sft_train.jsonl",
        "sft_eval": out / "sft_eval.jsonl",
        "preferences": out / "preferences.jsonl",
        "preferences_eval": out / "preferences_eval.jsonl",
    }
    texts = arithmetic.as_pretraining_text(pretrain, seed=seed, per_document=int(s.get("problems_per_document", 6)))
    _write_jsonl(paths["pretrain_text"], [{"text": t} for t in texts])
    # Demonstrations from a sloppy annotator: a share of them use a wrong operation (what the rm / dpo pairs fix).
    _write_jsonl(paths["sft_train"], arithmetic.as_chat_records(
        sft, wrong_operation_share=float(s.get("sft_wrong_operation_share", 0.0)), seed=seed))
    _write_jsonl(paths["sft_eval"], arithmetic.as_chat_records(heldout))
    # The wrong answers of the two files come from different random streams too.
    near_miss_share = float(s.get("preference_near_miss_share", arithmetic.NEAR_MISS_SHARE))
    _write_jsonl(paths["preferences"], arithmetic.as_preference_records(preference, seed=seed,
                                                                        near_miss_share=near_miss_share))
    _write_jsonl(paths["preferences_eval"], arithmetic.as_preference_records(
        preference_heldout, seed=seed + 1000, near_miss_share=near_miss_share))
    return StageResult(paths=paths, summary={"documents": len(texts), "sft_records": len(sft), "heldout": len(heldout),
                                             "preference_pairs": len(preference),
                                             "heldout_preference_pairs": len(preference_heldout)})


def stage_tokenizer(ctx: StageContext) -> StageResult:
    """Train a byte-level BPE on the pretraining text, with the chat template's special tokens."""
    from alignkit.data import load_records
    from alignkit.tokenizer import train_bpe

    s = ctx.section
    texts = [r["text"] for r in load_records(ctx.require("data", "pretrain_text"))]
    tokenizer = train_bpe(texts, vocab_size=int(s.get("vocab_size", 512)), template=str(s.get("template", "chatml")))
    tokenizer.save(ctx.stage_dir)
    sample = arithmetic.make_problems(1, seed=0)[0]
    tokens = len(tokenizer.encode(f"{sample.question} {sample.solution}"))
    return StageResult(paths={"tokenizer_dir": ctx.stage_dir},
                       summary={"vocab_size": tokenizer.vocab_size, "tokens_per_problem": tokens})


def _train_stage(ctx: StageContext, stage: str, filled: dict[str, Any]) -> StageResult:
    """Run trainer `stage` with the recipe section merged over the paths the pipeline fills in."""
    from alignkit.config import config_from_dict
    from alignkit.trainers import run, stage_module

    section = _merge(filled, ctx.section)
    section.setdefault("train", {})["output_dir"] = str(ctx.stage_dir)
    cfg = config_from_dict(stage_module(stage).Config, section, source=f"quickstart recipe section {ctx.name!r}")
    result = run(stage, cfg)
    last = result.metrics[-1] if result.metrics else {}
    summary: dict[str, Any] = {"steps": last.get("step"), "loss": last.get("loss")}
    # The last held-out value of each eval metric: eval/loss for every stage, eval/accuracy (rm),
    # eval/rewards/accuracies and eval/logps/* (dpo).
    for row in result.metrics:
        summary.update({key: value for key, value in row.items() if key.startswith("eval/")})
    summary["eval_loss"] = summary.get("eval/loss")
    return StageResult(paths={"model_dir": result.final_model_dir}, summary=summary)


def stage_pretrain(ctx: StageContext) -> StageResult:
    """A small Llama from scratch on the task's raw text."""
    return _train_stage(ctx, "pretrain", {
        "tokenizer": str(ctx.require("tokenizer", "tokenizer_dir")),
        "data": {"train": str(ctx.require("data", "pretrain_text")), "format": "text", "truncation": "split"},
        "train": {"seed": ctx.seed},
    })


def stage_sft(ctx: StageContext) -> StageResult:
    """Supervised fine-tuning of the pretrained model on chat records (loss on the assistant's answer only)."""
    return _train_stage(ctx, "sft", {
        "model": {"path": str(ctx.require("pretrain", "model_dir"))},
        "data": {"train": str(ctx.require("data", "sft_train")), "eval": str(ctx.require("data", "sft_eval")),
                 "format": "chat"},
        "train": {"seed": ctx.seed},
    })


def _preference_data(ctx: StageContext) -> dict[str, Any]:
    """The data section of the rm and dpo stages: the task's preference pairs and the held-out ones."""
    return {"train": str(ctx.require("data", "preferences")), "eval": str(ctx.require("data", "preferences_eval")),
            "format": "preference"}


def stage_rm(ctx: StageContext) -> StageResult:
    """A Bradley-Terry reward model from the SFT model (scalar head on its decoder), on the preference pairs."""
    return _train_stage(ctx, "rm", {
        "model": {"path": str(ctx.require("sft", "model_dir"))},
        "data": _preference_data(ctx),
        "train": {"seed": ctx.seed},
    })


def stage_dpo(ctx: StageContext) -> StageResult:
    """DPO of the SFT model on the preference pairs, with the SFT model as the (precomputed) reference."""
    return _train_stage(ctx, "dpo", {
        "model": {"path": str(ctx.require("sft", "model_dir"))},
        "data": _preference_data(ctx),
        "reference": {"precompute": True},
        "train": {"seed": ctx.seed},
    })


def stage_evaluate(ctx: StageContext) -> StageResult:
    """Held-out task accuracy, preference accuracy and loss of each listed model; reward models' pair accuracy."""
    s = ctx.section
    difficulty = int((ctx.recipe.get("data") or {}).get("difficulty", 1))
    num = int((ctx.recipe.get("data") or {}).get("eval_problems", 200))
    heldout = arithmetic.make_problems(num, ctx.seed * 10 + 3, difficulty, split="heldout")
    # Training operand pairs in new wordings (a seed no training file used): what was learnt, not how it generalises.
    seen_pairs = arithmetic.make_problems(num, ctx.seed * 10 + 4, difficulty, split="train")
    rows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    for name in s.get("models", ["pretrain", "sft"]):
        started = time.perf_counter()
        row, samples = _evaluate_causal_lm(ctx, ctx.require(name, "model_dir"), heldout, seen_pairs)
        rows.append({"step": len(rows), "model": name, **row, "eval_s": time.perf_counter() - started})
        examples += [{"model": name, **ex} for ex in samples[:3]]
    for name in s.get("reward_models", []):
        started = time.perf_counter()
        row = _evaluate_reward_model(ctx, ctx.require(name, "model_dir"))
        rows.append({"step": len(rows), "model": name, **row, "eval_s": time.perf_counter() - started})
    _write_jsonl(ctx.stage_dir / "metrics.jsonl", rows)
    _write_jsonl(ctx.stage_dir / "examples.jsonl", examples)
    return StageResult(summary={row["model"]: row for row in rows})


def _evaluate_causal_lm(ctx: StageContext, model_dir: Path, heldout: list[arithmetic.Problem],
                        seen_pairs: list[arithmetic.Problem]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One language model's evaluation row, and its sample generations on the held-out problems."""
    import alignkit
    from alignkit.data import load_records, pad_collate, tokenize_dataset, tokenize_preferences
    from alignkit.eval import evaluate_loss, preference_accuracy, verifiable_accuracy

    s = ctx.section
    max_new, batch_size = int(s.get("max_new_tokens", 24)), int(s.get("batch_size", 64))
    model, tokenizer = alignkit.load(str(model_dir))
    assert tokenizer is not None
    held = verifiable_accuracy(model, tokenizer, heldout, max_new_tokens=max_new, batch_size=batch_size)
    seen = verifiable_accuracy(model, tokenizer, seen_pairs, max_new_tokens=max_new, batch_size=batch_size)
    # The same held-out problems as plain text, the form pretraining saw (no chat template).
    text = verifiable_accuracy(model, tokenizer, heldout, max_new_tokens=max_new, batch_size=batch_size,
                               prompt_format="text")
    # Sampled at temperature 1 (the model's own distribution): a mistake the model makes some of the time
    # counts here even when greedy decoding avoids it.
    samples = int(s.get("samples_per_problem", 0))
    sampled = verifiable_accuracy(model, tokenizer, heldout, max_new_tokens=max_new, batch_size=batch_size,
                                  temperature=float(s.get("temperature", 1.0)), samples_per_problem=samples,
                                  seed=ctx.seed) if samples else None
    examples = tokenize_dataset(load_records(ctx.require("data", "sft_eval")), tokenizer, format="chat", max_length=256)
    loss = evaluate_loss(model, [pad_collate(examples[i : i + 64], pad_id=tokenizer.pad_token_id)
                                 for i in range(0, len(examples), 64)])
    # Held-out preference accuracy: the fraction of held-out pairs where the model itself gives the correct solution
    # a higher summed log-prob than the wrong one. No reference model, so every language model (pretrained, SFT, DPO)
    # is measured the same way; DPO's own eval/rewards/accuracies is the version relative to the SFT model.
    path = ctx.require("data", "preferences_eval")
    pairs, _ = tokenize_preferences(load_records(path), tokenizer, max_length=256, source=str(path))
    preference = preference_accuracy(model, None, pairs, pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    row = {
        "accuracy/heldout": held["accuracy"], "accuracy/train_pairs": seen["accuracy"],
        "accuracy/heldout_plain_text": text["accuracy"], "accuracy/preference_heldout": preference["accuracy"],
        **({"accuracy/heldout_sampled": sampled["accuracy"]} if sampled is not None else {}),
        "preference/logp_margin": preference["margin_mean"],
        "eval/loss": loss["loss"], "eval/perplexity": loss["perplexity"],
        "num_problems": held["num"], "num_pairs": preference["num"],
    }
    return row, held["examples"]


def _evaluate_reward_model(ctx: StageContext, model_dir: Path) -> dict[str, Any]:
    """A reward model's held-out pair accuracy (reward of chosen > reward of rejected) and mean reward margin."""
    import torch

    from alignkit.data import load_records
    from alignkit.eval import reward_accuracy
    from alignkit.rewards.scoring import load_reward_model, score_conversations

    batch_size = int(ctx.section.get("batch_size", 64))
    model, tokenizer = load_reward_model(model_dir)
    records = load_records(ctx.require("data", "preferences_eval"))
    chosen = torch.tensor(score_conversations(model, tokenizer, [(r["prompt"], r["chosen"]) for r in records],
                                              batch_size=batch_size))
    rejected = torch.tensor(score_conversations(model, tokenizer, [(r["prompt"], r["rejected"]) for r in records],
                                                batch_size=batch_size))
    return {"accuracy/preference_heldout": reward_accuracy(chosen, rejected),
            "preference/reward_margin": float((chosen - rejected).mean()), "num_pairs": len(records)}


def stage_report(ctx: StageContext) -> StageResult:
    """Write report.md and the plots for the whole run directory."""
    from alignkit.report import build_report

    path = build_report(ctx.run_dir, title="alignkit quickstart", summary=_headline(ctx))
    return StageResult(paths={"report": path})


def _headline(ctx: StageContext) -> list[str]:
    """The report's first section: every evaluated model's held-out numbers side by side, and SFT vs DPO in words."""
    evaluated = ctx.results.get("evaluate")
    if evaluated is None:
        return []
    lines = ["## Summary", "", "| model | " + " | ".join(header for _, header in SUMMARY_COLUMNS) + " |",
             "|---|" + "---:|" * len(SUMMARY_COLUMNS)]
    for name, row in evaluated.summary.items():
        cells = [f"{row[key]:.3f}" if row.get(key) is not None else "-" for key, _ in SUMMARY_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "held-out acc: greedy answers to held-out problems through the chat template; sampled acc: the "
              "same problems, answers sampled at temperature 1 (a mistake the model makes some of the time counts "
              "here even when greedy decoding avoids it); train-pair acc: "
              "training operand pairs in new wordings; pref acc: held-out pairs (a correct solution and a wrong "
              "one) where the model's summed log-prob of the correct one is higher, or for a reward model its reward.",
              ""]
    compared = comparison(evaluated.summary, *_compared_pair(ctx.recipe))
    lines += [f"- {line}" for line in compared]
    return [*lines, ""] if compared else lines


STAGES: dict[str, Callable[[StageContext], StageResult]] = {
    "data": stage_data,
    "tokenizer": stage_tokenizer,
    "pretrain": stage_pretrain,
    "sft": stage_sft,
    "rm": stage_rm,
    "dpo": stage_dpo,
    "evaluate": stage_evaluate,
    "report": stage_report,
}

# What each stage takes from earlier ones: {stage: {earlier stage: what for}}. `check_stage_order` reads it so that
# a recipe listing stages in an impossible order fails before anything runs; `evaluate` also needs every model it
# lists (`evaluate.models`, `evaluate.reward_models`).
NEEDS: dict[str, dict[str, str]] = {
    "tokenizer": {"data": "the pretraining text to train the tokenizer on"},
    "pretrain": {"data": "the pretraining text", "tokenizer": "the tokenizer"},
    "sft": {"data": "the chat records", "pretrain": "the pretrained model to fine-tune"},
    "rm": {"data": "the preference pairs", "sft": "the SFT model the reward model starts from"},
    "dpo": {"data": "the preference pairs", "sft": "the SFT model, which is both the starting policy and the reference"},
    "evaluate": {"data": "the held-out problems and preference pairs"},
}


def check_stage_order(recipe: dict[str, Any], *, source: str = "recipe") -> None:
    """A ConfigError naming the stage and what it lacks when a stage comes before (or without) one it needs."""
    stages = list(recipe.get("stages", []))
    for position, name in enumerate(stages):
        needs = dict(NEEDS.get(name, {}))
        if name == "evaluate":
            section = recipe.get("evaluate") or {}
            for model in [*section.get("models", ["pretrain", "sft"]), *section.get("reward_models", [])]:
                needs.setdefault(str(model), "a model it evaluates (evaluate.models / evaluate.reward_models)")
        for needed, why in needs.items():
            if needed in stages[:position]:
                continue
            where = "comes after it" if needed in stages else "is not in the list"
            raise ConfigError(
                f"{source}: stage {name!r} needs stage {needed!r} ({why}), but {needed!r} {where}; put {needed!r} "
                f"before {name!r} in `stages` (the full order is {', '.join(STAGES)})."
            )


# ------------------------------------------------------------------------------------------------ the recipe


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge: `override` wins, dicts merge key by key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(recipe: dict[str, Any], dotted: str, value: Any, *, source: str) -> None:
    """Set `a.b.c` in the nested recipe; the first key must be a top-level key of the recipe."""
    keys = dotted.split(".")
    if keys[0] not in recipe:
        raise ConfigError(f"{source}: {dotted!r} does not start with a recipe section ({', '.join(recipe)}).")
    node = recipe
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {dotted!r} goes through {key!r}, which is a value, not a section.")
    node[keys[-1]] = value


def _parse_value(raw: str) -> Any:
    """A YAML scalar, except that "2e-4" is a float (YAML 1.1 reads exponents without a dot as strings)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _read_recipe(path: str | Path | None) -> tuple[dict[str, Any], str]:
    """A recipe file and its name for messages; `base:` (a path, or `packaged:<name>`) is read first and merged under."""
    if path is None or str(path).startswith("packaged:"):
        name = PACKAGED_RECIPE if path is None else str(path).split(":", 1)[1]
        text, source = resources.files("alignkit").joinpath("recipes").joinpath(name).read_text(), f"alignkit/recipes/{name}"
    else:
        text, source = Path(path).read_text(), str(path)
    recipe = yaml.safe_load(text) or {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"{source}: a quickstart recipe is a YAML mapping of sections; this file is not.")
    base = recipe.pop("base", None)
    if base is not None:
        if path is not None and not str(base).startswith("packaged:") and not Path(base).is_absolute():
            base = Path(path).parent / base
        parent, _ = _read_recipe(base)
        recipe = _merge(parent, recipe)
    return recipe, source


def load_recipe(path: str | Path | None, *, fast: bool = False, overrides: list[str] = ()) -> dict[str, Any]:
    """The recipe at `path` (default: the packaged one), with `--fast` and `key=value` overrides applied.

    A recipe may start from another with `base: packaged:quickstart.yaml` (or a path relative to it) and list only
    what it changes; sections merge key by key.
    """
    recipe, source = _read_recipe(path)
    if fast:
        for dotted, value in (recipe.get("fast") or {}).items():
            apply_override(recipe, dotted, value, source=f"{source} (fast)")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key.sub=value, e.g. pretrain.train.max_steps=100.")
        dotted, raw = item.split("=", 1)
        apply_override(recipe, dotted, _parse_value(raw), source="command line")
    unknown = [s for s in recipe.get("stages", []) if s not in STAGES]
    if unknown:
        raise ConfigError(f"{source}: unknown stage {unknown[0]!r} in `stages`; the stages are {', '.join(STAGES)}.")
    check_stage_order(recipe, source=f"{source} with the command-line overrides" if overrides else source)
    return recipe


def run_pipeline(recipe: dict[str, Any], run_dir: str | Path, *, log: Callable[[str], None] = print) -> dict[str, StageResult]:
    """Run the recipe's stages in order in `run_dir`; return each stage's result."""
    check_stage_order(recipe)
    run_dir = Path(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"output directory {run_dir} is not empty; choose a new --output (or delete that folder).")
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = list(recipe.get("stages", []))
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (run_dir / "pipeline.json").write_text(json.dumps({"stages": stages}))
    ctx = StageContext(run_dir=run_dir, recipe=recipe, results={})
    for number, name in enumerate(stages, start=1):
        log(f"[{number}/{len(stages)}] {name}: {(STAGES[name].__doc__ or '').strip().splitlines()[0]}")
        ctx.name = name
        started = time.perf_counter()
        result = STAGES[name](ctx)
        result.seconds = time.perf_counter() - started
        ctx.results[name] = result
        log(f"[{number}/{len(stages)}] {name} done in {result.seconds:.1f} s")
    timings = {name: round(r.seconds, 2) for name, r in ctx.results.items()}
    (run_dir / "timings.json").write_text(json.dumps({"stages": timings, "total_s": round(sum(timings.values()), 2),
                                                      "cpus": os.cpu_count(), "machine": platform.machine()}))
    return ctx.results


# (row key, column header) of the summary table; a model without a value (a reward model has no task accuracy) gets "-".
SUMMARY_COLUMNS = (
    ("accuracy/heldout", "held-out acc"),
    ("accuracy/heldout_sampled", "sampled acc"),
    ("accuracy/train_pairs", "train-pair acc"),
    ("accuracy/heldout_plain_text", "plain-text acc"),
    ("accuracy/preference_heldout", "pref acc"),
    ("eval/loss", "eval loss"),
)
# What `comparison` reports, as (row key, words).
COMPARED = (
    ("accuracy/heldout", "held-out task accuracy"),
    ("accuracy/heldout_sampled", "held-out task accuracy, sampled at temperature 1"),
    ("accuracy/preference_heldout", "held-out preference accuracy"),
    ("preference/logp_margin", "held-out log-prob margin, chosen - rejected"),
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


def _compared_pair(recipe: dict[str, Any]) -> tuple[str, str]:
    pair = (recipe.get("evaluate") or {}).get("compare", ["sft", "dpo"])
    if not isinstance(pair, list) or len(pair) != 2:
        raise ConfigError(f"evaluate.compare is {pair!r}; it names two evaluated models, e.g. [sft, dpo].")
    return str(pair[0]), str(pair[1])


def summary_table(results: dict[str, StageResult], recipe: dict[str, Any] | None = None) -> str:
    """The short table printed at the end: each evaluated model's accuracies and loss, the SFT vs DPO comparison,
    then stage times."""
    lines = []
    evaluated = results.get("evaluate")
    if evaluated is not None:
        lines.append(f"{'model':<10}" + "".join(f" {header:>14}" for _, header in SUMMARY_COLUMNS))
        for name, row in evaluated.summary.items():
            cells = [f"{row[key]:>14.3f}" if row.get(key) is not None else f"{'-':>14}" for key, _ in SUMMARY_COLUMNS]
            lines.append(f"{name:<10} " + " ".join(cells))
        lines += comparison(evaluated.summary, *_compared_pair(recipe or {}))
    total = sum(r.seconds for r in results.values())
    lines.append("time: " + ", ".join(f"{n} {r.seconds:.0f}s" for n, r in results.items()) + f"; total {total:.0f}s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the command


def add_quickstart_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "quickstart", help="run the whole pipeline on a built-in arithmetic task (CPU, minutes, no download)",
        description="Generate arithmetic word problems, train a tokenizer, pretrain a small Llama from scratch, "
        "fine-tune it on chat records, evaluate held-out accuracy, and write a report with plots.",
    )
    parser.add_argument("--output", "-o", help="run directory (default: runs/quickstart-<timestamp>)")
    parser.add_argument("--recipe", help="recipe YAML (default: the one shipped in alignkit/recipes/quickstart.yaml)")
    parser.add_argument("--fast", action="store_true", help="a tiny model and a few steps: seconds, for tests")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="recipe overrides, e.g. pretrain.train.max_steps=200")
    parser.set_defaults(func=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, fast=args.fast, overrides=list(args.overrides))
    run_dir = Path(args.output or f"runs/quickstart-{datetime.now():%Y%m%d-%H%M%S}")
    results = run_pipeline(recipe, run_dir)
    print()
    print(summary_table(results, recipe))
    if "report" in results:
        print(f"report: {results['report'].paths['report']}")
    return 0
