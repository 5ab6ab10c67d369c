"""`alignkit quickstart`: the whole pipeline on the built-in arithmetic task, on a CPU, with no download.

    data -> tokenizer -> pretrain -> sft -> rm -> dpo -> rs -> grpo -> ppo -> ppo_ptx -> evaluate -> report

The recipe (`alignkit/recipes/quickstart.yaml`, typed in `alignkit.pipeline.recipe`) drives every stage; the stages
live in `alignkit.pipeline.stages`. This module is the command.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path
from typing import Any

from alignkit.pipeline import load_recipe, run_pipeline
from alignkit.report.summary import summary_table


def add_quickstart_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "quickstart", help="run the whole pipeline on a built-in arithmetic task (CPU, no download): tokenizer, "
        "pretrain, sft, rm, dpo, rs, grpo, ppo, ppo_ptx, evaluate, report",
        description="Every stage in order, each in its own folder of the run directory: data (generate arithmetic "
        "word problems), tokenizer (train a byte-level BPE), pretrain (a small Llama from scratch), sft (fine-tune "
        "it on chat records), rm (a reward model on checked preference pairs), dpo (DPO on the same pairs), rs "
        "(rejection sampling with the task's checker), grpo (GRPO with the checker as reward), ppo (PPO against the "
        "reward model), ppo_ptx (PPO with the pretraining loss mixed in), evaluate (held-out accuracy of every "
        "model) and report (report.md with plots). The recipe's `stages` list picks which run.",
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
    evaluated = results.get("evaluate")
    print()
    print(summary_table(evaluated.summary if evaluated is not None else None,
                        compare=(recipe.evaluate.compare[0], recipe.evaluate.compare[1]),
                        seconds={name: r.seconds for name, r in results.items()}))
    if "report" in results:
        print(f"report: {results['report'].paths['report']}")
    return 0
