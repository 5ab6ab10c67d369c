"""`alignkit convert SRC OUT` (GGUF / HF -> HF safetensors), `alignkit info PATH` (what a checkpoint is) and
`alignkit merge` (fold a LoRA adapter into its base model and save a plain HF model directory)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from alignkit.checkpoint import load_pretrained, resolve_model_path
from alignkit.checkpoint.gguf import gguf_config, open_gguf, quantization_summary
from alignkit.checkpoint.hf import (
    checkpoint_kind,
    describe_files,
    expected_parameter_count,
    read_hf_config,
    safetensors_shapes,
    save_hf_model,
)
from alignkit.errors import CheckpointError, ConfigError
from alignkit.model import DTYPES
from alignkit.model.config import ModelConfig


def add_convert_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a GGUF file or HF directory to an HF safetensors directory (with its tokenizer)",
        description="Convert a llama.cpp GGUF file (dequantised) or an HF model directory into an HF safetensors "
        "directory that alignkit and transformers load.",
    )
    parser.add_argument("src", help="a .gguf file, an HF model directory or an alignkit run directory")
    parser.add_argument("out", help="output directory (created; an existing model directory is replaced)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    src = resolve_model_path(args.src)
    kind = "causal_lm"
    if src.is_dir():
        _, raw = read_hf_config(src)
        kind = checkpoint_kind(raw)
    out = Path(args.out)
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: the output directory is the source; choose another output directory.")
    model, tokenizer = load_pretrained(src, dtype=DTYPES[args.dtype], kind=kind)  # type: ignore[arg-type]
    files = save_hf_model(model, out, tokenizer=tokenizer)
    print(f"wrote {out} ({type(model).__name__}, {args.dtype}, {model.num_parameters():,} parameters):")
    for line in describe_files(files):
        print(f"  {line}")
    if tokenizer is None:
        print("  (no tokenizer: the source has none)")
    return 0


def add_info_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info",
        help="print a checkpoint's architecture, sizes, parameter count and KV-cache cost",
        description="Describe an HF model directory, a GGUF file or an alignkit run's model without loading "
        "its weights (GGUF: metadata only; HF: config.json and safetensors headers).",
    )
    parser.add_argument("path", help="a .gguf file, an HF model directory or an alignkit run directory")
    parser.set_defaults(func=run_info)


def describe(path: str | Path) -> list[tuple[str, str]]:
    """(label, value) rows for `alignkit info`, read from metadata and tensor headers only."""
    resolved = resolve_model_path(path)
    rows: list[tuple[str, str]] = [("path", str(resolved))]
    if resolved.is_file():
        reader = open_gguf(resolved)
        config = gguf_config(reader, source=str(resolved))
        kind = "causal_lm"
        architecture = "llama (GGUF)"
        stored = sum(int(t.n_elements) for t in reader.tensors if t.name != "rope_freqs.weight")
        rows.append(("format", f"GGUF ({quantization_summary(reader)})"))
    else:
        config, raw = read_hf_config(resolved)
        kind = checkpoint_kind(raw)
        architecture = (raw.get("architectures") or ["?"])[0]
        shapes = safetensors_shapes(resolved)
        stored = 0
        for name, shape in shapes.items():
            if name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight"):
                continue
            n = 1
            for d in shape:
                n *= d
            stored += n
        stored_dtype = raw.get("torch_dtype") or raw.get("dtype") or "?"
        rows.append(("format", f"HF safetensors ({len(shapes)} tensors, stored as {stored_dtype})"))
    rows.append(("architecture", f"{architecture} (model_type {config.model_type})"))
    rows.extend(_config_rows(config))
    expected = expected_parameter_count(config, kind)  # type: ignore[arg-type]
    check = "matches the stored tensors" if stored == expected else f"MISMATCH: the stored tensors hold {stored:,}"
    rows.append(("parameters", f"{expected:,} ({check})"))
    rows.append((
        "KV cache per token",
        f"{config.kv_cache_bytes_per_token(2):,} bytes bf16, {config.kv_cache_bytes_per_token(4):,} bytes fp32",
    ))
    return rows


def _config_rows(config: ModelConfig) -> list[tuple[str, str]]:
    scaling = "none"
    if config.rope_scaling:
        scaling = ", ".join(f"{k}={v}" for k, v in config.rope_scaling.items())
    return [
        ("layers", str(config.num_layers)),
        ("hidden size", str(config.hidden_size)),
        ("intermediate size", str(config.intermediate_size)),
        ("attention", config.attention_kind),
        ("heads / KV heads", f"{config.num_heads} / {config.num_kv_heads}"),
        ("head dim", str(config.head_dim)),
        ("vocab size", str(config.vocab_size)),
        ("context window", str(config.max_position_embeddings)),
        ("rope theta", f"{config.rope_theta:g}"),
        ("rope scaling", scaling),
        ("tied embeddings", "yes" if config.tie_word_embeddings else "no"),
    ]


def run_info(args: argparse.Namespace) -> int:
    rows = describe(args.path)
    width = max(len(label) for label, _ in rows) + 1
    for label, value in rows:
        print(f"{label + ':':<{width}} {value}")
    return 0


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
    from alignkit.model.lora import load_adapter, merge_lora, read_adapter_config

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
