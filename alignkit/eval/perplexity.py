"""Held-out loss and perplexity, weighted by tokens (not by batch), so batch size never changes the number."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from alignkit.losses.logprobs import IGNORE_INDEX, token_logprobs

if TYPE_CHECKING:
    from alignkit.data import Batch
    from alignkit.model import LlamaForCausalLM


@torch.no_grad()
def evaluate_loss(model: LlamaForCausalLM, batches: Iterable[Batch]) -> dict[str, float]:
    """Mean negative log-likelihood per target token over all `batches`, and its exponential.

    `loss = sum over every target token of -log p(token) / number of target tokens`: a batch with 10 targets
    counts ten times as much as one with 1, unlike a mean of per-batch means. Labels are already shifted
    (`Batch.labels`, -100 where nothing is predicted). Returns {"loss", "perplexity", "num_tokens"}; with no
    target tokens at all the loss is NaN.
    """
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        for batch in batches:
            batch = batch.to(model.device)
            targets = batch.labels != IGNORE_INDEX
            if not targets.any():
                continue
            logits = model(
                batch.input_ids,
                position_ids=batch.position_ids,
                # Packed rows carry document ids (block-diagonal attention); padded rows an attention mask.
                document_ids=batch.document_ids,
                attention_mask=batch.attention_mask if batch.document_ids is None else None,
                logits_mask=targets,
            )  # [N, V] at the target positions only
            total_nll -= float(token_logprobs(logits, batch.labels[targets]).double().sum())
            total_tokens += int(targets.sum())
    finally:
        model.train(was_training)
    loss = total_nll / total_tokens if total_tokens else math.nan
    # exp overflows past ~709; a model that bad has an infinite perplexity for every practical purpose.
    perplexity = math.exp(loss) if loss < 700 else math.inf
    return {"loss": loss, "perplexity": perplexity, "num_tokens": total_tokens}
