"""The quickstart's stages and the loop that runs them: each stage is a function of a `StageContext` (the run
directory, the typed recipe, earlier stages' results) that writes into its own folder of the run directory.

    data -> tokenizer -> pretrain -> sft -> rm -> dpo -> rs -> grpo -> ppo -> ppo_ptx -> evaluate -> report

The training stages are ordinary `alignkit train` runs: the recipe's section is the stage's config, and the
pipeline fills in the paths between stages (tokenizer, data files, model.path), train.seed (the recipe's seed)
and train.output_dir (the stage's folder). A later stage (ppo) is one more function here, one more name in the
recipe's `stages`, and one more section in the recipe.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit.config import config_to_dict
from alignkit.errors import ConfigError
from alignkit.pipeline.recipe import STAGE_NAMES, TRAINERS, QuickstartRecipe, check_stage_order, stage_config
from alignkit.tasks import arithmetic


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
    recipe: QuickstartRecipe
    results: dict[str, StageResult]
    name: str = ""

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.name

    def require(self, stage: str, path: str) -> Path:
        """A path an earlier stage produced; a ConfigError naming both stages when that stage did not run."""
        if stage not in self.results or path not in self.results[stage].paths:
            raise ConfigError(
                f"stage {self.name!r} needs the {path} of stage {stage!r}; put {stage!r} before {self.name!r} "
                "in the recipe's `stages` list."
            )
        return self.results[stage].paths[path]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# Seed offsets of the generated files: distinct streams per use, and every training file drawn from the "train"
# operand pairs only. 1 pretraining text, 2 SFT, 3 held-out problems, 4 training pairs in new wordings (evaluate),
# 5 preference pairs for rm / dpo, 6 held-out preference pairs.
def heldout_problems(recipe: QuickstartRecipe) -> list[arithmetic.Problem]:
    data = recipe.data
    return arithmetic.make_problems(data.eval_problems, recipe.seed * 10 + 3, data.difficulty, split="heldout")


def stage_data(ctx: StageContext) -> StageResult:
    """Generate the task's data files: pretraining text, SFT chat records, preference pairs, held-out problems."""
    data, seed = ctx.recipe.data, ctx.recipe.seed
    pretrain = arithmetic.make_problems(data.pretrain_problems, seed * 10 + 1, data.difficulty)
    sft = arithmetic.make_problems(data.sft_problems, seed * 10 + 2, data.difficulty)
    heldout = heldout_problems(ctx.recipe)
    preference = arithmetic.make_problems(data.preference_problems, seed * 10 + 5, data.difficulty)
    preference_heldout = arithmetic.make_problems(data.preference_eval_problems, seed * 10 + 6, data.difficulty,
                                                  split="heldout")
    out = ctx.stage_dir
    paths = {
        "pretrain_text": out / "pretrain.jsonl",
        "sft_train": out / "sft_train.jsonl",
        "sft_eval": out / "sft_eval.jsonl",
        "preferences": out / "preferences.jsonl",
        "preferences_eval": out / "preferences_eval.jsonl",
        "grpo_prompts": out / "grpo_prompts.jsonl",
        "heldout_plain_text": out / "heldout_plain_text.jsonl",
    }
    texts = arithmetic.as_pretraining_text(pretrain, seed=seed, per_document=data.problems_per_document)
    write_jsonl(paths["pretrain_text"], [{"text": t} for t in texts])
    # Demonstrations from a sloppy annotator: a share of them use a wrong operation (what the rm / dpo pairs fix).
    write_jsonl(paths["sft_train"], arithmetic.as_chat_records(
        sft, wrong_operation_share=data.sft_wrong_operation_share, seed=seed))
    write_jsonl(paths["sft_eval"], arithmetic.as_chat_records(heldout))
    # The wrong answers of the two files come from different random streams too.
    write_jsonl(paths["preferences"], arithmetic.as_preference_records(
        preference, seed=seed, near_miss_share=data.preference_near_miss_share))
    write_jsonl(paths["preferences_eval"], arithmetic.as_preference_records(
        preference_heldout, seed=seed + 1000, near_miss_share=data.preference_near_miss_share))
    # RL prompts with a checkable answer: training operand pairs, a seed no other file uses (7).
    grpo = arithmetic.make_problems(data.grpo_problems, seed * 10 + 7, data.difficulty)
    write_jsonl(paths["grpo_prompts"], [{"question": p.question, "answer": p.answer} for p in grpo])
    # The held-out problems as task records: ppo's forgetting monitor asks them as plain text at each evaluation.
    write_jsonl(paths["heldout_plain_text"], [{"question": p.question, "answer": p.answer} for p in heldout])
    return StageResult(paths=paths, summary={"documents": len(texts), "sft_records": len(sft), "heldout": len(heldout),
                                             "preference_pairs": len(preference),
                                             "heldout_preference_pairs": len(preference_heldout)})


def stage_tokenizer(ctx: StageContext) -> StageResult:
    """Train a byte-level BPE on the pretraining text, with the chat template's special tokens."""
    from alignkit.data import load_records
    from alignkit.tokenizer import train_bpe

    section = ctx.recipe.tokenizer
    texts = [r["text"] for r in load_records(str(ctx.require("data", "pretrain_text")))]
    tokenizer = train_bpe(texts, vocab_size=section.vocab_size, template=section.template)
    tokenizer.save(ctx.stage_dir)
    sample = arithmetic.make_problems(1, seed=0)[0]
    tokens = len(tokenizer.encode(f"{sample.question} {sample.solution}"))
    return StageResult(paths={"tokenizer_dir": ctx.stage_dir},
                       summary={"vocab_size": tokenizer.vocab_size, "tokens_per_problem": tokens})


def stage_train(ctx: StageContext) -> StageResult:
    """Run the stage's trainer on its recipe section, with the paths of earlier stages filled in, seeded by the
    recipe and writing into the stage's folder."""
    from alignkit.trainers import run

    cfg = stage_config(ctx.recipe, ctx.name, lambda stage, key: str(ctx.require(stage, key)),
                       output_dir=str(ctx.stage_dir))
    result = run(TRAINERS[ctx.name], cfg)
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
    return stage_train(ctx)


def stage_sft(ctx: StageContext) -> StageResult:
    """Supervised fine-tuning of the pretrained model on chat records (loss on the assistant's answer only)."""
    return stage_train(ctx)


def stage_rm(ctx: StageContext) -> StageResult:
    """A Bradley-Terry reward model from the SFT model (scalar head on its decoder), on the preference pairs."""
    return stage_train(ctx)


def stage_dpo(ctx: StageContext) -> StageResult:
    """DPO of the SFT model on the preference pairs, with the SFT model as the (precomputed) reference."""
    return stage_train(ctx)


def stage_rs(ctx: StageContext) -> StageResult:
    """Rejection sampling from the SFT model: sample answers, keep correct ones (the task's checker), SFT on them."""
    return stage_train(ctx)


def stage_grpo(ctx: StageContext) -> StageResult:
    """GRPO from the SFT model on the task's prompts, rewarded by the answer checker (RL with verifiable rewards)."""
    return stage_train(ctx)


def stage_ppo(ctx: StageContext) -> StageResult:
    """PPO from the SFT model against the reward model (RLHF: a learned reward, a critic, a KL penalty)."""
    return stage_train(ctx)


def stage_evaluate(ctx: StageContext) -> StageResult:
    """Held-out task accuracy, preference accuracy and loss of each listed model; reward models' pair accuracy."""
    from alignkit.eval import evaluate_language_model, evaluate_reward_model

    recipe, section = ctx.recipe, ctx.recipe.evaluate
    heldout = heldout_problems(recipe)
    # Training operand pairs in new wordings (a seed no training file used): what was learnt, not how it generalises.
    seen_pairs = arithmetic.make_problems(recipe.data.eval_problems, recipe.seed * 10 + 4, recipe.data.difficulty,
                                          split="train")
    rows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    for name in section.models:
        started = time.perf_counter()
        row, samples = evaluate_language_model(
            ctx.require(name, "model_dir"), heldout=heldout, seen_pairs=seen_pairs,
            chat_eval=ctx.require("data", "sft_eval"), preference_eval=ctx.require("data", "preferences_eval"),
            max_new_tokens=section.max_new_tokens, batch_size=section.batch_size, max_length=section.max_length,
            samples_per_problem=section.samples_per_problem, temperature=section.temperature, seed=recipe.seed)
        rows.append({"step": len(rows), "model": name, **row, "eval_s": time.perf_counter() - started})
        examples += [{"model": name, **ex} for ex in samples[:3]]
    for name in section.reward_models:
        started = time.perf_counter()
        row = evaluate_reward_model(ctx.require(name, "model_dir"), preference_eval=ctx.require("data", "preferences_eval"),
                                    batch_size=section.batch_size)
        rows.append({"step": len(rows), "model": name, **row, "eval_s": time.perf_counter() - started})
    write_jsonl(ctx.stage_dir / "metrics.jsonl", rows)
    write_jsonl(ctx.stage_dir / "examples.jsonl", examples)
    return StageResult(summary={row["model"]: row for row in rows})


def stage_report(ctx: StageContext) -> StageResult:
    """Write report.md and the plots for the whole run directory."""
    from alignkit.report import build_report
    from alignkit.report.summary import summary_section

    evaluated = ctx.results.get("evaluate")
    compare = (ctx.recipe.evaluate.compare[0], ctx.recipe.evaluate.compare[1])
    headline = summary_section(evaluated.summary, compare=compare) if evaluated is not None else []
    # The report ends with a command per model; they ask the first held-out problem (and score its solution).
    problem = next(iter(heldout_problems(ctx.recipe)), None)
    path = build_report(ctx.run_dir, title="alignkit quickstart", summary=headline,
                        try_prompt=problem.question if problem else None,
                        try_response=problem.solution if problem else None)
    return StageResult(paths={"report": path})


STAGES: dict[str, Callable[[StageContext], StageResult]] = {
    "data": stage_data,
    "tokenizer": stage_tokenizer,
    "pretrain": stage_pretrain,
    "sft": stage_sft,
    "rm": stage_rm,
    "dpo": stage_dpo,
    "rs": stage_rs,
    "grpo": stage_grpo,
    "ppo": stage_ppo,
    "ppo_ptx": stage_ppo,
    "evaluate": stage_evaluate,
    "report": stage_report,
}
assert tuple(STAGES) == STAGE_NAMES, "the recipe's stage names and the stage functions must agree"


def run_pipeline(recipe: QuickstartRecipe, run_dir: str | Path, *, log: Callable[[str], None] | None = None
                 ) -> dict[str, StageResult]:
    """Run the recipe's stages in order in `run_dir`; return each stage's result."""
    import logging

    log = log or logging.getLogger(__name__).info
    check_stage_order(recipe)
    run_dir = Path(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"output directory {run_dir} is not empty; choose a new --output (or delete that folder).")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(config_to_dict(recipe), sort_keys=False))
    (run_dir / "pipeline.json").write_text(json.dumps({"stages": recipe.stages}))
    ctx = StageContext(run_dir=run_dir, recipe=recipe, results={})
    total = len(recipe.stages)
    for number, name in enumerate(recipe.stages, start=1):
        log(f"[{number}/{total}] {name}: {(STAGES[name].__doc__ or '').strip().splitlines()[0]}")
        ctx.name = name
        started = time.perf_counter()
        result = STAGES[name](ctx)
        result.seconds = time.perf_counter() - started
        ctx.results[name] = result
        log(f"[{number}/{total}] {name} done in {result.seconds:.1f} s")
    timings = {name: round(r.seconds, 2) for name, r in ctx.results.items()}
    (run_dir / "timings.json").write_text(json.dumps({"stages": timings, "total_s": round(sum(timings.values()), 2),
                                                      "cpus": os.cpu_count(), "machine": platform.machine()}))
    return ctx.results
