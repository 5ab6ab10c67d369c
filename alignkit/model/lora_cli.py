"""`alignkit merge`: fold a LoRA adapter into its base model and save a plain HF model directory."""

from __future__ import annotations

import argparse
from typing import Any

from alignkit.errors import ConfigError
from alignkit.model.lora import load_adapter, merge_lora, read_adapter_config


def add_merge_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model and save an HF model directory",
        description=(
            "Load the base model, apply the LoRA adapter (alignkit's or peft's adapter directory), fold "
            "scaling * B @ A into each adapted weight and save the result as an HF directory that "
            "transformers and alignkit load without peft."
        ),
    )
    parser.add_argument(
        "--base",
        help="base model: an HF directory, a .gguf file or an alignkit run directory "
        "(default: the adapter's base_model_name_or_path)",
    )
    parser.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--output", required=True, help="directory to write the merged HF model to")
    parser.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    import alignkit
    from alignkit.checkpoint import save_hf_model

    base = args.base or read_adapter_config(args.adapter).get("base_model_name_or_path")
    if not base:
        raise ConfigError(
            f"{args.adapter}/adapter_config.json has no base_model_name_or_path; pass the base model with --base."
        )
    model, tokenizer = alignkit.load(base)
    load_adapter(model, args.adapter)
    merge_lora(model)
    save_hf_model(model, args.output, tokenizer=tokenizer)
    print(f"merged adapter {args.adapter} into {base}; wrote {args.output}")
    return 0
