"""causal_lm_loss: hand-computed values and the global-token-count invariant of gradient accumulation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.losses import causal_lm_loss

LN3 = math.log(3.0)


def test_docstring_example() -> None:
    logits = torch.tensor([[0.0, LN3], [0.0, LN3], [5.0, 1.0]])
    labels = torch.tensor([1, 0, -100])
    loss, metrics = causal_lm_loss(logits, labels)
    assert abs(loss.item() - 0.836988) < 1e-6
    assert abs(loss.item() - (-math.log(0.75) - math.log(0.25)) / 2) < 1e-6
    assert metrics["num_tokens"].item() == 2.0
    assert abs(metrics["loss"].item() - 0.836988) < 1e-6
    loss4, metrics4 = causal_lm_loss(logits, labels, num_tokens=4)
    assert abs(loss4.item() - 0.418494) < 1e-6
    assert abs(metrics4["loss"].item() - 0.836988) < 1e-6  # the metric stays the micro-batch mean
    assert not metrics["loss"].requires_grad


def test_mean_matches_torch_cross_entropy() -> None:
    logits = torch.randn(2, 9, 31)
    labels = torch.randint(0, 31, (2, 9))
    labels[0, :3] = -100
    loss, _ = causal_lm_loss(logits, labels)
    expected = F.cross_entropy(logits.reshape(-1, 31), labels.reshape(-1), ignore_index=-100)
    assert abs(loss.item() - expected.item()) < 1e-6


def test_micro_batches_with_global_count_equal_full_batch_mean() -> None:
    """8 sequences of very different lengths: summing the micro-batch losses, each divided by the global count,
    gives the full-batch per-token mean, and so do the gradients. Per-micro-batch means would not."""
    vocab = 17
    weight = torch.randn(vocab, 8, requires_grad=True)
    lengths = [1, 2, 3, 5, 8, 13, 21, 34]
    hidden = [torch.randn(n, 8) for n in lengths]
    labels = [torch.randint(0, vocab, (n,)) for n in lengths]

    full_loss, _ = causal_lm_loss(torch.cat(hidden) @ weight.T, torch.cat(labels))
    (full_grad,) = torch.autograd.grad(full_loss, weight)

    global_tokens = sum(lengths)
    accumulated = torch.zeros(())
    accumulated_grad = torch.zeros_like(weight)
    naive = torch.zeros(())
    for start in range(0, 8, 2):  # 4 micro-batches of 2 sequences
        h, y = torch.cat(hidden[start : start + 2]), torch.cat(labels[start : start + 2])
        micro, _ = causal_lm_loss(h @ weight.T, y, num_tokens=torch.tensor(global_tokens))
        (grad,) = torch.autograd.grad(micro, weight)
        accumulated, accumulated_grad = accumulated + micro.detach(), accumulated_grad + grad
        naive = naive + causal_lm_loss(h @ weight.T, y)[0].detach() / 4
    assert abs(accumulated.item() - full_loss.item()) < 1e-6
    torch.testing.assert_close(accumulated_grad, full_grad, atol=1e-6, rtol=0)
    assert abs(naive.item() - full_loss.item()) > 1e-3  # the wrong way really is different here


def test_nonpositive_token_count_is_an_error() -> None:
    with pytest.raises(ValueError, match="positive token count"):
        causal_lm_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), num_tokens=0)
