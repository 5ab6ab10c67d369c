"""Next-token cross-entropy for pretraining and SFT."""

from __future__ import annotations

import torch

from alignkit.losses.logprobs import IGNORE_INDEX, token_logprobs


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_tokens: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level negative log-likelihood: `sum_i -log p(labels[i]) / num_tokens`.

    `logits` is `[N, V]` (or `[B, T, V]`) and `labels` has the same leading shape, already aligned with the
    logits (the caller shifted them); positions labelled `ignore_index` do not count.

    Why `num_tokens` should be the GLOBAL count: an optimizer step averages over every target token of the step,
    across gradient-accumulation micro-batches and data-parallel ranks. If each micro-batch returned its own mean,
    the step would average the micro-batch means, so a token in a micro-batch of 10 targets would weigh 10 times
    more than a token in a micro-batch of 100 (SFT responses vary a lot in length), and the result would change
    with the micro-batch size. Returning `sum(nll) / global_num_tokens` from each micro-batch instead makes the sum of
    the returned losses (and of their gradients) exactly the mean over the whole step. DDP averages gradients over ranks, so under DDP pass
    `global_num_tokens / world_size` (or scale the loss by world size). With `num_tokens=None` it is the local mean.

    Metrics (detached): `loss` = this micro-batch's own mean NLL per token (readable on its own),
    `num_tokens` = this micro-batch's target count (to weight `loss` when averaging over micro-batches).

    Example: two tokens with log p = ln(3/4) and ln(1/4) (logits [0, ln 3], labels 1 and 0):
    nll = 0.287682 + 1.386294 = 1.673976; mean = 0.836988; with num_tokens=4: 0.418494.
    """
    if isinstance(num_tokens, int) and num_tokens <= 0:
        raise ValueError(f"causal_lm_loss: num_tokens must be a positive token count, got {num_tokens}.")
    logps = token_logprobs(logits, labels, ignore_index=ignore_index)
    local_tokens = (labels != ignore_index).sum()
    nll_sum = -logps.sum()
    local_mean = nll_sum / local_tokens.clamp(min=1)
    loss = local_mean if num_tokens is None else nll_sum / num_tokens
    metrics = {"loss": local_mean.detach(), "num_tokens": local_tokens.detach().to(torch.float32)}
    return loss, metrics
