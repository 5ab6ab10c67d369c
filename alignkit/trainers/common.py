"""What the language-model trainers share around the engine: run setup, model and tokenizer, data, the LM loss and
evaluation, and the final export. Each stage file (pretrain.py, sft.py, ...) strings these together top to bottom.

Order matters: everything that can fail on the user's input (config, model path, data files and records) runs
before the run directory gets a checkpoint, so a typo never leaves a half-started run behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alignkit.config import config_to_dict, save_config
from alignkit.data import (
    Batch,
    TokenizedExample,
    load_records,
    pack_examples,
    packed_collate,
    pad_collate,
    tokenize_dataset,
)
from alignkit.engine import DistInfo, Engine, Models, StepBatches, Trainable, init_distributed
from alignkit.engine import distributed as dist
from alignkit.errors import ConfigError, DataError
from alignkit.losses.lm import causal_lm_loss
from alignkit.losses.logprobs import IGNORE_INDEX
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
        model.set_gradient_checkpointing(True)
    return model, tokenizer


def add_lora(model: nn.Module, lora: LoRASection) -> None:
    if lora.enabled:
        from alignkit.model.lora import apply_lora

        apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)


# ---------------------------------------------------------------------------------------------- data


def read_records(source: str, data: DataSection) -> list[dict[str, Any]]:
    records = load_records(source, text_field=data.text_field)
    if data.limit is not None:
        records = records[: data.limit]
    if not records:
        raise DataError(f"{source} has no records; check the path or data.limit.")
    return records


def load_examples(
    data: DataSection, tokenizer: Tokenizer, *, format: str | None = None
) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """Tokenised (train, eval) examples. Without data.eval, a seeded random eval_fraction / eval_size is held out."""
    if not data.train:
        raise ConfigError("data.train is empty; set it to a dataset file, folder or hub name.")
    kwargs = dict(format=format or data.format, max_length=data.max_length, truncation=data.truncation,
                  text_field=data.text_field)
    train = tokenize_dataset(read_records(data.train, data), tokenizer, source=data.train, **kwargs)  # type: ignore[arg-type]
    if data.eval:
        held_out = tokenize_dataset(read_records(data.eval, data), tokenizer, source=data.eval, **kwargs)  # type: ignore[arg-type]
        return train, held_out
    size = data.eval_size if data.eval_size is not None else math.ceil(data.eval_fraction * len(train))
    if size <= 0:
        return train, []
    if size >= len(train):
        raise DataError(
            f"{data.train}: holding out {size} of {len(train)} examples for evaluation leaves none to train on; "
            "lower data.eval_fraction / data.eval_size or set data.eval."
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(data.seed)).tolist()
    held = set(order[:size])
    return [ex for i, ex in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def batching(
    examples: list[TokenizedExample], data: DataSection, tokenizer: Tokenizer
) -> tuple[list[Any], Callable[[list[Any]], Batch]]:
    """(items, collate): packed rows of data.max_length (items are bins), or right-padded examples."""
    pad_id = tokenizer.pad_token_id
    if data.packing:
        bins = pack_examples(examples, max_length=data.max_length)
        return bins, lambda items: packed_collate(items, max_length=data.max_length, pad_id=pad_id)
    return list(examples), lambda items: pad_collate(items, pad_id=pad_id)


def total_steps(train: TrainSection, steps_per_epoch: int) -> int:
    return train.max_steps if train.max_steps is not None else max(1, math.ceil(train.epochs * steps_per_epoch))


# ---------------------------------------------------------------------------------------------- loss and eval


def lm_forward(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, V] at the N target positions, and their labels [N]."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    targets = batch.labels != IGNORE_INDEX
    # Right padding: plain causal attention is exact for every real token (padding only follows it), and it
    # keeps SDPA's fused causal kernel; packed rows need the per-document mask.
    logits = model(batch.input_ids, position_ids=batch.position_ids, document_ids=batch.document_ids,
                   logits_mask=targets)
    return logits, batch.labels[targets]


def lm_loss(models: Models, batch: Batch, num_tokens: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """The engine's loss_fn for pretraining and SFT: summed token NLL / the step's global target count."""
    logits, labels = lm_forward(models["model"], batch)
    loss, _ = causal_lm_loss(logits, labels, num_tokens=num_tokens)
    return loss, {}


def lm_eval_fn(items: list[Any], collate: Callable[[list[Any]], Batch], batch_size: int, info: DistInfo
               ) -> Callable[[Models], dict[str, float]]:
    """Held-out loss (mean NLL per target token over all ranks) and perplexity = exp(loss)."""
    mine = items[info.rank :: info.world_size]

    def evaluate(models: Models) -> dict[str, float]:
        totals = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(mine), batch_size):
            logits, labels = lm_forward(models["model"], collate(mine[start : start + batch_size]))
            nll_sum, _ = causal_lm_loss(logits, labels, num_tokens=1)
            totals += torch.tensor([float(nll_sum), labels.numel()], dtype=torch.float64)
        dist.all_reduce_sum(totals)
        loss = float(totals[0] / totals[1].clamp(min=1))
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}

    return evaluate


# ---------------------------------------------------------------------------------------------- run directory


# Settings a resumed run must share with the run it continues: they fix the shapes of the trained tensors, the
# model they start from, or what each step number means.
RESUME_KEYS = ("model.path", "model.init", "model.dtype", "tokenizer", "lora.enabled", "lora.rank",
               "lora.target_modules", "data.train", "data.max_length", "data.packing", "train.batch_size",
               "train.seed")


def stage_name(cfg: Any) -> str:
    """`sft` for an SFTConfig, `dpo` for a DPOConfig, ...: what run.json records."""
    return type(cfg).__name__.removesuffix("Config").lower()


def check_resume(run_dir: Path, cfg: Any) -> None:
    """Refuse, before anything is written, to resume a run of another stage, with settings that change what was
    trained, or from a folder whose only checkpoints were cut off mid-save."""
    import yaml

    from alignkit.engine.checkpoint import CHECKPOINTS, list_checkpoints

    stage = stage_name(cfg)
    info_path = run_dir / "run.json"
    if info_path.is_file():
        saved_stage = json.loads(info_path.read_text()).get("stage")
        if saved_stage != stage:
            raise ConfigError(
                f"{run_dir} holds a '{saved_stage}' run; it cannot be resumed by `alignkit train {stage}`. Resume it "
                f"with `alignkit train {saved_stage}`, or choose another train.output_dir."
            )
    saved_config = run_dir / "config.yaml"
    if saved_config.is_file() and list_checkpoints(run_dir):
        old = config_to_dict_flat(yaml.safe_load(saved_config.read_text()) or {})
        new = config_to_dict_flat(config_to_dict(cfg))
        for key in RESUME_KEYS:
            if old.get(key) != new.get(key):
                raise ConfigError(
                    f"Resuming {run_dir} with {key}={new.get(key)!r}, but its checkpoints were trained with "
                    f"{key}={old.get(key)!r}; resume with the same value, or start a new run in another "
                    "train.output_dir."
                )
    partial = sorted((run_dir / CHECKPOINTS).glob(".tmp-*")) if (run_dir / CHECKPOINTS).is_dir() else []
    if partial and not list_checkpoints(run_dir):
        raise ConfigError(
            f"{run_dir} holds only {partial[-1].name}, a checkpoint cut off while it was being written; there is "
            "nothing complete to resume. Delete the folder, or start over without --resume in another "
            "train.output_dir."
        )


def config_to_dict_flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"path": x}} -> {"model.path": x}; lists and model.init stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" != "model.init":
            flat.update(config_to_dict_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def prepare_run_dir(cfg: Any, info: DistInfo) -> Path:
    """Check a resumed run against the one it continues, then create the run directory and write the resolved
    config.yaml and run.json (rank 0)."""
    from alignkit.engine.checkpoint import list_checkpoints

    run_dir = Path(cfg.train.output_dir)
    if cfg.train.resume:
        check_resume(run_dir, cfg)
    elif list_checkpoints(run_dir):
        raise ConfigError(
            f"{run_dir} already holds checkpoints from an earlier run; pass --resume (train.resume=true) to continue "
            "it, or choose another train.output_dir."
        )
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "run.json").write_text(json.dumps({"stage": stage_name(cfg)}) + "\n")
    dist.barrier()
    return run_dir


def saved_tokenizer(cfg: Any) -> Tokenizer | None:
    """On resume, the tokenizer the interrupted run saved (a trained BPE must not be retrained differently)."""
    path = Path(cfg.train.output_dir) / "tokenizer"
    return Tokenizer.from_dir(path) if cfg.train.resume and (path / "tokenizer.json").is_file() else None


def train_language_model(
    cfg: Any,
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    train_examples: list[TokenizedExample],
    eval_examples: list[TokenizedExample],
    info: DistInfo,
    *,
    loss_fn: Callable[[Models, Batch, int], tuple[torch.Tensor, dict[str, Any]]] = lm_loss,
) -> RunResult:
    """The shared body of pretraining and SFT once data and model are ready: batch, train, export."""
    items, collate = batching(train_examples, cfg.data, tokenizer)
    batches = StepBatches(items, collate=collate, batch_size=cfg.train.batch_size,
                          micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                          rank=info.rank, world_size=info.world_size)
    steps = total_steps(cfg.train, batches.steps_per_epoch)
    eval_fn = None
    if eval_examples:
        eval_items, eval_collate = batching(eval_examples, cfg.data, tokenizer)
        eval_fn = lm_eval_fn(eval_items, eval_collate, cfg.train.micro_batch_size, info)
    run_dir = prepare_run_dir(cfg, info)
    if info.is_main:
        tokenizer.save(run_dir / "tokenizer")
    engine = Engine({"model": Trainable(model, cfg.optim)}, cfg.train, run_dir=run_dir, total_steps=steps,
                    dist_info=info, config_dict=config_to_dict(cfg))
    metrics = engine.train(batches, loss_fn, eval_fn=eval_fn)
    final = export(model, tokenizer, run_dir, lora=cfg.lora, base_model=cfg.model.path, info=info)
    return RunResult(run_dir=run_dir, final_model_dir=final, metrics=metrics)


def export(model: nn.Module, tokenizer: Tokenizer, run_dir: Path, *, lora: LoRASection, base_model: str | None,
           info: DistInfo) -> Path:
    """Full model -> final/ (HF format with the tokenizer). LoRA -> adapter/ (peft format) and the merged final/.

    Collective: under FSDP2 the shards are gathered into one full copy on rank 0 first."""
    from alignkit.checkpoint import save_hf_model

    final = run_dir / "final"
    whole = unsharded_copy(model, lora, info)
    if whole is not None:
        if lora.enabled:
            from alignkit.model.lora import merge_lora, save_adapter

            save_adapter(whole, run_dir / "adapter", base_model_name_or_path=str(base_model or ""))
            merge_lora(whole)
        save_hf_model(whole, final, tokenizer=tokenizer)  # type: ignore[arg-type]
    dist.barrier()
    return final


def unsharded_copy(model: nn.Module, lora: LoRASection, info: DistInfo) -> nn.Module | None:
    """The model with whole tensors on rank 0 (None on the other ranks): the model itself, or under FSDP2 a new
    CPU copy built from the gathered shards (collective), with the same LoRA layers."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model if info.is_main else None
    state = dist.full_state_dict(model)
    if not info.is_main:
        return None
    dtype = next(t.dtype for k, t in state.items() if "lora_" not in k)
    whole = type(model)(model.config).to(dtype)  # type: ignore[operator]
    add_lora(whole, lora)
    whole.load_state_dict(state)
    return whole
