"""`alignkit train <stage> --config recipe.yaml [dotted.key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Any

from alignkit.config import config_help, load_config
from alignkit.trainers import STAGES

USAGE_EXAMPLE = """examples:
  alignkit train sft --config recipes/sft_smollm2_alpaca_lora.yaml train.max_steps=50 optim.lr=2e-4
  alignkit train pretrain --config recipes/pretrain_tiny_shakespeare.yaml --resume
  torchrun --nproc_per_node 2 -m alignkit.cli train sft --config recipe.yaml
"""


def add_train_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model: " + ", ".join(STAGES),
        description="Train one stage of the pipeline. Each stage reads a YAML recipe; any field can be overridden "
        "with key.sub=value. `alignkit train <stage> --help` lists every field.",
        epilog=USAGE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stages = parser.add_subparsers(dest="stage", metavar="<stage>")
    for name, module_name in STAGES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue  # stage not built yet
            raise
        summary = (module.__doc__ or name).strip().splitlines()[0]
        sub = stages.add_parser(
            name, help=summary, description=summary,
            epilog=f"config fields (override any with key.sub=value):\n{config_help(module.Config)}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--config", "-c", help="YAML recipe (fields not in it keep their defaults)")
        sub.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, applied in order")
        sub.add_argument("--resume", action="store_true",
                         help="continue from the newest complete checkpoint in train.output_dir")
        sub.set_defaults(func=_run, stage_config=module.Config)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)


def _run(args: argparse.Namespace) -> int:
    from alignkit.engine import close_distributed
    from alignkit.trainers import run

    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    cfg = load_config(args.stage_config, args.config, overrides)
    result = run(args.stage, cfg)
    # Only after success: after an error on one rank, a barrier would wait on ranks stuck in a collective.
    close_distributed()
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 speaks for the run
    last = next((row for row in reversed(result.metrics) if "eval/loss" in row), None)
    summary = f" (eval loss {last['eval/loss']:.4f})" if last else ""
    adapter = result.run_dir / "adapter"
    adapter_note = f", LoRA adapter (peft format) in {adapter}" if adapter.is_dir() and cfg.lora.enabled else ""
    print(f"Run finished{summary}: model in {result.final_model_dir}{adapter_note}, metrics in "
          f"{result.run_dir / 'metrics.jsonl'}")
    return 0
