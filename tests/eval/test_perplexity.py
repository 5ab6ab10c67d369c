"""evaluate_loss: token-weighted mean NLL, checked against uniform logits and a plain cross-entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from alignkit.data import TokenizedExample, pad_collate
from alignkit.eval import evaluate_loss
from alignkit.model import LlamaForCausalLM
from tests.conftest import tiny_config


class UniformModel(nn.Module):
    """Logits of zero everywhere: every token has probability 1/V, so the loss is ln V whatever the data."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.dummy.device

    def forward(self, input_ids: torch.Tensor, *, logits_mask: torch.Tensor, **_: object) -> torch.Tensor:
        return torch.zeros(int(logits_mask.sum()), self.vocab_size)


def _batches() -> list:
    a = TokenizedExample(input_ids=[1, 2, 3, 4, 5], loss_mask=[True] * 5)  # targets 2, 3, 4, 5
    b = TokenizedExample(input_ids=[6, 7], loss_mask=[False, True])  # target 7
    c = TokenizedExample(input_ids=[8, 9, 10], loss_mask=[False, True, True])  # targets 9, 10
    return [pad_collate([a], pad_id=0), pad_collate([b, c], pad_id=0)]


def test_uniform_logits_give_ln_vocab() -> None:
    """Hand computation: p = 1/16 for each of the 7 targets -> loss = ln 16 = 2.7726, perplexity = 16."""
    out = evaluate_loss(UniformModel(16), _batches())  # type: ignore[arg-type]
    assert out["num_tokens"] == 4 + 1 + 2  # a: 2..5 are targets; b: 7; c: 9 and 10 (the first token never is)
    assert math.isclose(out["loss"], math.log(16), rel_tol=1e-6)
    assert math.isclose(out["perplexity"], 16.0, rel_tol=1e-5)


def test_token_weighted_against_cross_entropy() -> None:
    model = LlamaForCausalLM(tiny_config(vocab_size=16))
    model.init_weights()
    batches = _batches()
    # Reference: run each example on its own, sum NLL over targets with F.cross_entropy, divide by token count.
    nll, tokens, batch_means = 0.0, 0, []
    for batch in batches:
        batch_nll, batch_tokens = 0.0, 0
        for row in range(batch.input_ids.shape[0]):
            length = int(batch.attention_mask[row].sum())
            logits = model(batch.input_ids[row : row + 1, :length])[0]
            labels = batch.labels[row, :length]
            batch_nll += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").detach())
            batch_tokens += int((labels != -100).sum())
        nll, tokens = nll + batch_nll, tokens + batch_tokens
        batch_means.append(batch_nll / batch_tokens)
    out = evaluate_loss(model, batches)
    assert out["num_tokens"] == tokens == 7
    assert math.isclose(out["loss"], nll / tokens, rel_tol=1e-5)
    assert math.isclose(out["perplexity"], math.exp(nll / tokens), rel_tol=1e-5)
    # A mean of per-batch means would weight the 4-token batch like the 2-token one: a different number.
    assert not math.isclose(out["loss"], sum(batch_means) / 2, rel_tol=1e-4)
    assert model.training  # mode restored


def test_no_targets_gives_nan() -> None:
    empty = pad_collate([TokenizedExample(input_ids=[1, 2], loss_mask=[False, False])], pad_id=0)
    out = evaluate_loss(UniformModel(8), [empty])  # type: ignore[arg-type]
    assert out["num_tokens"] == 0 and math.isnan(out["loss"])
