"""Building blocks of every training stage: run setup, tokenizer, model, LoRA, records. Each stage file
(pretrain.py, sft.py, rm.py, dpo.py, ...) builds its model and data with these, then hands them to the stage
skeleton (`alignkit.trainers.stage`).

Order matters: everything that can fail on the user's input (config, model path, data files and records) runs
before the run directory gets a checkpoint, so a typo never leaves a half-started run behind.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alignkit.data import load_records
from alignkit.engine import DistInfo, init_distributed
from alignkit.errors import ConfigError, DataError
from alignkit.model import DTYPES, LlamaForCausalLM, ModelConfig
from alignkit.tokenizer import Tokenizer
from alignkit.trainers.configs import DataSection, LoRASection, ModelSection, TrainSection


@dataclass
class RunResult:
    """What a finished run produced: its directory, the exported model, and the metrics.jsonl rows."""

    run_dir: Path
    final_model_dir: Path
    metrics: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------- setup


def setup(train: TrainSection) -> DistInfo:
    """Threads, seeds (python, numpy, torch) and the process group; the same seed on every rank."""
    if train.num_threads > 0:
        torch.set_num_threads(train.num_threads)
    info = init_distributed(train.device)
    random.seed(train.seed)
    np.random.seed(train.seed)
    torch.manual_seed(train.seed)
    return info


def load_tokenizer(spec: str, *, texts: Sequence[str] = ()) -> Tokenizer:
    """A tokenizer from a folder with tokenizer.json, a .gguf file, "byte" (256 byte symbols plus ChatML's
    special tokens, no merges) or "bpe:N" (byte-level BPE with N tokens trained on `texts`)."""
    from alignkit.tokenizer import train_bpe
    from alignkit.tokenizer.templates import TEMPLATE_SPECIAL_TOKENS

    if spec == "byte":
        return train_bpe([], vocab_size=256 + len(TEMPLATE_SPECIAL_TOKENS["chatml"]["tokens"]))
    if spec.startswith("bpe:"):
        try:
            vocab_size = int(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"tokenizer {spec!r}: write bpe:<vocab size>, for example bpe:1024.") from None
        return train_bpe(texts, vocab_size=vocab_size)
    path = Path(spec)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if path.is_file() and path.suffix == ".gguf":
        import gguf

        return Tokenizer.from_gguf(gguf.GGUFReader(str(path)), source=str(path))
    raise ConfigError(
        f"tokenizer {spec!r} is not a folder with tokenizer.json, a .gguf file, 'byte' or 'bpe:<vocab size>'."
    )


def build_model(
    section: ModelSection, tokenizer: Tokenizer | None, *, device: torch.device
) -> tuple[LlamaForCausalLM, Tokenizer]:
    """Load `section.path` (with its tokenizer unless one is given) or initialise `section.init` from scratch."""
    if section.path is not None:
        from alignkit.checkpoint import load_pretrained

        model, own_tokenizer = load_pretrained(section.path, dtype=DTYPES[section.dtype], device=device)
        tokenizer = tokenizer or own_tokenizer
        if tokenizer is None:
            raise ConfigError(f"model.path {section.path} has no tokenizer.json; set `tokenizer` to a tokenizer path.")
        if not isinstance(model, LlamaForCausalLM):
            raise ConfigError(f"model.path {section.path} is not a causal language model.")
    elif section.init is not None:
        if tokenizer is None:
            raise ConfigError("model.init trains from scratch and needs `tokenizer` (a path, 'byte' or 'bpe:N').")
        init = {"vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **section.init}
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(init) - known)
        if unknown:
            raise ConfigError(f"model.init.{unknown[0]} is not a ModelConfig field; valid fields: {', '.join(sorted(known))}.")
        if init["vocab_size"] < tokenizer.vocab_size:
            raise ConfigError(
                f"model.init.vocab_size {init['vocab_size']} is smaller than the tokenizer's {tokenizer.vocab_size}."
            )
        model = LlamaForCausalLM(ModelConfig(**init))
        model.init_weights()
        model.to(device=device, dtype=DTYPES[section.dtype])
    else:
        raise ConfigError("Set model.path (a model to fine-tune) or model.init (a ModelConfig to train from scratch).")
    if section.gradient_checkpointing:
        model.set_gradient_checkpointing(section.gradient_checkpointing)
    return model, tokenizer


def add_lora(model: nn.Module, lora: LoRASection) -> None:
    if lora.enabled:
        from alignkit.model.lora import apply_lora

        apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)


def read_records(source: str, data: DataSection) -> list[dict[str, Any]]:
    records = load_records(source, text_field=data.text_field)
    if data.limit is not None:
        records = records[: data.limit]
    if not records:
        raise DataError(f"{source} has no records; check the path or data.limit.")
    return records


def total_steps(train: TrainSection, steps_per_epoch: int) -> int:
    return train.max_steps if train.max_steps is not None else max(1, math.ceil(train.epochs * steps_per_epoch))


def saved_tokenizer(cfg: Any) -> Tokenizer | None:
    """On resume, the tokenizer the interrupted run saved (a trained BPE must not be retrained differently)."""
    path = Path(cfg.train.output_dir) / "tokenizer"
    return Tokenizer.from_dir(path) if cfg.train.resume and (path / "tokenizer.json").is_file() else None
