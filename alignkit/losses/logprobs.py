"""Log-probabilities of target tokens, per-sequence sums, and entropy, computed from logits without waste.

Trainers that call the model with a boolean `logits_mask` get logits only at the N response positions, flattened
row-major into `[N, V]`. `token_logprobs` turns those into `log p(label)` `[N]`; `segment_ids_from_mask` says which
sequence each of the N positions came from; `sequence_logprobs` sums them back per sequence.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Rows of logits upcast to fp32 at once. Bounds the temporary copy to about 64 MiB whatever the vocabulary
# (for V = 128k: 128 rows), instead of an fp32 copy of the whole [N, V] tensor.
_CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(vocab_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_size))


class _TokenLogProbs(torch.autograd.Function):
    """`z[label] - logsumexp(z)` in fp32, chunk by chunk, with a hand-written backward.

    Autograd through `logits.float().log_softmax(-1)` would keep an fp32 `[N, V]` copy alive until backward: for
    8k tokens and a 128k vocabulary that is 4 GiB on top of the bf16 logits. Here forward keeps only the
    per-row logsumexp `[N]`, and backward rebuilds softmax one chunk at a time:
    d/dz (z[y] - lse(z)) = onehot(y) - softmax(z).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        num_rows, vocab_size = logits.shape
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lse = torch.empty(num_rows, dtype=out_dtype, device=logits.device)
        step = _chunk_rows(vocab_size)
        for start in range(0, num_rows, step):
            lse[start : start + step] = torch.logsumexp(logits[start : start + step].to(out_dtype), dim=-1)
        target = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).to(out_dtype)
        ctx.save_for_backward(logits, labels, lse)
        return target - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        step = _chunk_rows(logits.shape[-1])
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            # -grad_out * softmax, in place on one fp32 copy of the chunk.
            chunk_grad = logits[rows].to(lse.dtype, copy=True).sub_(lse[rows, None]).exp_().mul_(-grad_out[rows, None])
            # The one-hot part, added in fp32 so a bf16 gradient is rounded once.
            chunk_grad.scatter_add_(-1, labels[rows, None], grad_out[rows, None])
            grad[rows] = chunk_grad.to(logits.dtype)
        return grad, None


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """log p(label) under softmax(logits), in fp32 (fp64 for fp64 logits), for `[N, V]` or `[B, T, V]` logits.

    `log p(y) = z[y] - logsumexp(z)`, with the logsumexp taken in fp32 chunk by chunk, so bf16 logits never get a
    full fp32 copy (see `_TokenLogProbs`). Positions whose label is `ignore_index` get 0 and no gradient, so a
    padded `[B, T]` result can be summed over T directly.

    Example: logits [0, ln 3] (p = [1/4, 3/4]), label 1 -> log(3/4) = -0.287682; label 0 -> log(1/4) = -1.386294.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"token_logprobs: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must share every "
            "dimension but the last (vocabulary); pass labels aligned with the logits."
        )
    lead_shape = labels.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    # Gather needs an in-range index; ignored positions read column 0 and are zeroed (with their gradient) below.
    safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
    logps = _TokenLogProbs.apply(flat_logits, safe_labels)
    logps = torch.where(valid, logps, torch.zeros_like(logps))
    return logps.reshape(lead_shape)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension, in fp32: `H = logsumexp(z) - sum_v softmax(z)_v * z_v`.

    Returns the leading shape (`[N]` or `[B, T]`). Computed chunk by chunk; it is differentiable, but autograd keeps
    each chunk's fp32 copy, so call it under `torch.no_grad()` when it is only a metric.

    Example: logits [0, 0] -> ln 2 = 0.693147; logits [0, ln 3] -> -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335.
    """
    lead_shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    step = _chunk_rows(flat.shape[-1])
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    parts = []
    for start in range(0, flat.shape[0], step):
        chunk = flat[start : start + step].to(out_dtype)
        log_probs = chunk.log_softmax(dim=-1)
        parts.append(-(log_probs.exp() * log_probs).sum(dim=-1))
    if not parts:
        return flat.new_zeros(lead_shape, dtype=out_dtype)
    return torch.cat(parts).reshape(lead_shape)


def segment_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """For a boolean `[B, T]` mask, the row index of each True position in row-major order: `[N]`, N = mask.sum().

    This matches the order of `model(..., logits_mask=mask)`'s `[N, V]` output. Example: mask
    [[0, 1, 1], [1, 0, 0]] -> [0, 0, 1].
    """
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)
    return rows[mask.bool()]


def sequence_logprobs(
    token_logps: torch.Tensor, segment_ids: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """Sum of token log-probs per sequence: `out[s] = sum_{i: segment_ids[i] == s} token_logps[i]`, `[num_segments]`.

    A sequence with no tokens gets 0. Differentiable (an index_add). Example: token_logps [-1, -2, -0.5],
    segment_ids [0, 0, 1], num_segments 3 -> [-3.0, -0.5, 0.0].
    """
    out = token_logps.new_zeros(num_segments)
    return out.index_add(0, segment_ids, token_logps)


def sequence_lengths(segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Number of tokens per sequence, `[num_segments]` int64. Example: [0, 0, 1], 3 -> [2, 1, 0]."""
    counts = torch.zeros(num_segments, dtype=torch.long, device=segment_ids.device)
    return counts.index_add(0, segment_ids, torch.ones_like(segment_ids, dtype=torch.long))
