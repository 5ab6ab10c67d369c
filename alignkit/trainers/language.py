"""What pretraining and SFT share: tokenised examples, packed or padded batches, the next-token loss on the target
tokens and its held-out evaluation (loss and perplexity)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from alignkit.data import (
    Batch,
    TokenizedExample,
    pack_examples,
    packed_collate,
    pad_collate,
    tokenize_dataset,
)
from alignkit.data.mixing import mix_sources
from alignkit.engine import DistInfo, Models
from alignkit.errors import ConfigError
from alignkit.losses.lm import causal_lm_loss
from alignkit.losses.logprobs import IGNORE_INDEX
from alignkit.model import LlamaForCausalLM
from alignkit.tokenizer import Tokenizer
from alignkit.trainers.common import RunResult, read_records
from alignkit.trainers.configs import DataSection
from alignkit.trainers.stage import hold_out, train_stage

logger = logging.getLogger(__name__)


def load_examples(
    data: DataSection, tokenizer: Tokenizer, *, format: str | None = None
) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """Tokenised (train, eval) examples. Without data.eval, a seeded random eval_fraction / eval_size is held out
    (from the first source when data.train lists several, which are then mixed by data.weights)."""
    if not data.train:
        raise ConfigError("data.train is empty; set it to a dataset file, folder or hub name.")
    kwargs = dict(format=format or data.format, max_length=data.max_length, truncation=data.truncation,
                  text_field=data.text_field, skip_invalid=data.skip_invalid)
    sources = [tokenize_dataset(read_records(source, data), tokenizer, source=source, **kwargs)  # type: ignore[arg-type]
               for source in data.sources]
    if data.eval:
        held_out = tokenize_dataset(read_records(data.eval, data), tokenizer, source=data.eval, **kwargs)  # type: ignore[arg-type]
    else:
        sources[0], held_out = hold_out(sources[0], data)
    if len(sources) == 1:
        return sources[0], held_out
    train, counts = mix_sources(sources, data.weights, seed=data.seed, names=data.sources)
    logger.info("data: mixture of " + ", ".join(f"{count} examples from {source} ({len(examples)} there)"
                                               for source, count, examples in zip(data.sources, counts, sources)))
    return train, held_out


def batching(
    examples: list[TokenizedExample], data: DataSection, tokenizer: Tokenizer
) -> tuple[list[Any], Callable[[list[Any]], Batch]]:
    """(items, collate): packed rows of data.max_length (items are bins), or right-padded examples."""
    pad_id = tokenizer.pad_token_id
    if data.packing:
        bins = pack_examples(examples, max_length=data.max_length)
        return bins, lambda items: packed_collate(items, max_length=data.max_length, pad_id=pad_id)
    return list(examples), lambda items: pad_collate(items, pad_id=pad_id)


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


def lm_evaluate_batch(models: Models, batch: Batch) -> tuple[dict[str, float], int]:
    """Held-out next-token loss of one micro-batch: the summed NLL and its target tokens."""
    logits, labels = lm_forward(models["model"], batch)
    nll_sum, _ = causal_lm_loss(logits, labels, num_tokens=1)
    return {"loss": float(nll_sum)}, labels.numel()


def with_perplexity(values: dict[str, float]) -> dict[str, float]:
    """eval/perplexity = exp(eval/loss), the mean NLL per target token over all ranks."""
    return {**values, "perplexity": math.exp(min(values["loss"], 50.0))}


def train_language_model(
    cfg: Any,
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    train_examples: list[TokenizedExample],
    eval_examples: list[TokenizedExample],
    info: DistInfo,
) -> RunResult:
    """The shared body of pretraining and SFT once data and model are ready: batch, train, export."""
    items, collate = batching(train_examples, cfg.data, tokenizer)
    eval_items, _ = batching(eval_examples, cfg.data, tokenizer) if eval_examples else ([], None)
    return train_stage(cfg, info, model, tokenizer, train_items=items, eval_items=eval_items, collate=collate,
                       loss_fn=lm_loss, evaluate_batch=lm_evaluate_batch, eval_finish=with_perplexity)
