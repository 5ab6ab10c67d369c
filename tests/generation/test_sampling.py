"""Logits processors against plain re-implementations and `transformers`' own processors, on fixed logits."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.generation.sampling import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    draw,
    inverse_cdf,
    presence_mask,
    process_logits,
    sample,
)

transformers = pytest.importorskip("transformers")

NEG_INF = float("-inf")


def fixed_logits() -> torch.Tensor:
    """[3, 10]: a peaked row, a flat-ish row with ties, and a row with negative and positive logits."""
    return torch.tensor([
        [4.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0, -4.0],
        [1.0, 1.0, 1.0, 0.9, 0.8, 0.2, 0.1, 0.0, -0.5, -0.5],
        [-2.0, 3.0, -0.5, 0.7, 1.5, -3.0, 2.2, 0.1, -1.2, 0.4],
    ])


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [sorted(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


def test_top_k_keeps_k_largest() -> None:
    logits = fixed_logits()
    out = apply_top_k(logits, 3)
    # Row 1 has three tokens tied at 1.0: exactly those survive.
    assert kept(out) == [[0, 1, 2], [0, 1, 2], [1, 4, 6]]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])
    hf = transformers.TopKLogitsWarper(top_k=3)(torch.zeros(3, 1, dtype=torch.long), logits.clone())
    assert torch.equal(out, hf)
    assert torch.equal(apply_top_k(logits, 0), logits)


def plain_top_p(row: torch.Tensor, top_p: float) -> list[int]:
    """Most likely first: keep tokens until the kept probability mass reaches top_p (HF: strictly more than
    1 - top_p of the mass is kept, i.e. drop a tail only while its mass stays <= 1 - top_p)."""
    probs = row.softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: probs[i])  # ascending, like HF
    dropped, tail = [], 0.0
    for i in order[:-1]:
        if tail + probs[i] <= 1 - top_p:
            tail += probs[i]
            dropped.append(i)
        else:
            break
    return sorted(set(range(len(probs))) - set(dropped))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.8, 0.95])
def test_top_p_matches_plain_and_transformers(top_p: float) -> None:
    logits = fixed_logits()[[0, 2]]  # rows without ties, so the sort order is unambiguous
    out = apply_top_p(logits, top_p)
    assert kept(out) == [plain_top_p(row, top_p) for row in logits]
    hf = transformers.TopPLogitsWarper(top_p=top_p)(torch.zeros(2, 1, dtype=torch.long), logits.clone())
    assert torch.equal(out, hf)
    # Row 0: p = softmax([4, 2.5, ...]); the top token alone has p = 0.6816, so top_p = 0.5 keeps only it.
    assert kept(apply_top_p(logits[:1], 0.5)) == [[0]]


def test_min_p_matches_plain_and_transformers() -> None:
    logits = fixed_logits()
    out = apply_min_p(logits, 0.1)
    probs = logits.softmax(-1)
    expected = [[i for i in range(10) if probs[r, i] >= 0.1 * probs[r].max()] for r in range(3)]
    assert kept(out) == expected
    # Row 0: sum(e^row) = 80.107, p_max = 0.6816; 0.1 * p_max = 0.0682 keeps 2.5 (p = 0.1521) and 2.0 (0.0922),
    # drops 1.0 (0.0339).
    assert expected[0] == [0, 1, 2]
    hf = transformers.MinPLogitsWarper(min_p=0.1)(torch.zeros(3, 1, dtype=torch.long), logits.clone())
    assert torch.equal(out, hf)


def test_repetition_penalty_matches_transformers() -> None:
    logits = fixed_logits()
    previous = torch.tensor([[0, 6, 6, 9], [3, 3, 3, 3], [0, 1, 2, 5]])
    out = apply_repetition_penalty(logits, presence_mask(previous, 10), 1.3)
    hf = transformers.RepetitionPenaltyLogitsProcessor(penalty=1.3)(previous, logits.clone())
    assert torch.allclose(out, hf)
    # Hand-checked: positive logits are divided, negative ones multiplied; absent tokens untouched.
    assert out[0, 0].item() == pytest.approx(4.0 / 1.3)
    assert out[0, 6].item() == pytest.approx(-1.3)
    assert out[0, 1].item() == 2.5
    assert out[2, 5].item() == pytest.approx(-3.9)


def test_presence_mask_ignores_padding() -> None:
    ids = torch.tensor([[7, 7, 1, 2], [0, 0, 3, 7]])
    valid = torch.tensor([[True] * 4, [False, False, True, True]])
    mask = presence_mask(ids, 8, valid=valid)
    assert torch.nonzero(mask).tolist() == [[0, 1], [0, 2], [0, 7], [1, 3], [1, 7]]


def test_temperature_and_processing_order() -> None:
    logits = fixed_logits()
    assert torch.allclose(apply_temperature(logits, 0.5), logits * 2)
    params = SamplingParams(temperature=0.5, top_k=4, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    presence = presence_mask(torch.tensor([[1], [2], [3]]), 10)
    out = process_logits(logits, params, presence)
    # HF's order: penalty -> temperature -> top-k -> top-p -> min-p.
    processors = transformers.LogitsProcessorList([
        transformers.RepetitionPenaltyLogitsProcessor(1.2), transformers.TemperatureLogitsWarper(0.5),
        transformers.TopKLogitsWarper(4), transformers.TopPLogitsWarper(0.9), transformers.MinPLogitsWarper(0.05),
    ])
    hf = processors(torch.tensor([[1], [2], [3]]), logits.clone())
    assert torch.allclose(out, hf)


def test_greedy_sample_is_argmax_with_zero_sampling_logprob() -> None:
    logits = fixed_logits()
    tokens, sampling_logprob, raw_logprob = sample(logits, SamplingParams(temperature=0), None)
    assert tokens.tolist() == [0, 0, 1]  # row 1: first of the tied maxima
    assert sampling_logprob.tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(raw_logprob, logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1))
    # Row 0 by hand: log(e^4 / sum(e^row)) = log(54.598 / 80.107) = log(0.68157) = -0.38338.
    assert raw_logprob[0].item() == pytest.approx(math.log(0.68157), abs=1e-4)


def test_sampled_logprobs_and_frequencies() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 1.5]]).repeat(20000, 1)
    params = SamplingParams(temperature=0.7, top_k=3)
    generator = torch.Generator().manual_seed(0)
    tokens, sampling_logprob, raw_logprob = sample(logits, params, generator)
    # Top-3 keeps tokens 0, 4, 1; at T = 0.7 their probabilities are softmax([2, 1.5, 1] / 0.7).
    expected = torch.softmax(torch.tensor([2.0, 1.5, 1.0]) / 0.7, -1)  # [0.5783, 0.2831, 0.1386]
    counts = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert counts[[2, 3]].sum().item() == 0.0
    assert torch.allclose(counts[[0, 4, 1]], expected, atol=0.015)
    log_expected = {0: expected[0].log(), 4: expected[1].log(), 1: expected[2].log()}
    for token in (0, 4, 1):
        where = tokens == token
        assert torch.allclose(sampling_logprob[where], log_expected[token].expand(int(where.sum())), atol=1e-6)
        raw = logits[0].log_softmax(-1)[token]
        assert torch.allclose(raw_logprob[where], raw.expand(int(where.sum())), atol=1e-6)


def test_unprocessed_sampling_logprob_is_the_raw_one() -> None:
    """At temperature 1 without filters or penalty the sampling distribution is the model's: the two log-probs of
    every drawn token are equal, and bf16 logits give what their fp32 values give."""
    logits = fixed_logits()
    generator = torch.Generator().manual_seed(0)
    tokens, sampling_logprob, raw_logprob = sample(logits.bfloat16(), SamplingParams(), generator)
    assert torch.equal(sampling_logprob, raw_logprob)
    expected = logits.bfloat16().float().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
    assert torch.equal(raw_logprob, expected)
    # A banned token (before min_new_tokens) makes them differ again.
    _, banned_logprob, _ = sample(logits, SamplingParams(), torch.Generator().manual_seed(0), banned=[0])
    assert not torch.equal(banned_logprob, sample(logits, SamplingParams(), torch.Generator().manual_seed(0))[2])


def test_inverse_cdf_by_hand_and_at_the_edges() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0]]).expand(7, 6)
    # Running sums 0, .5, .5, .7, 1, 1: u selects the first index whose sum exceeds u.
    uniform = torch.tensor([[0.0], [0.25], [0.4999], [0.5], [0.69], [0.7], [1 - 2**-53]], dtype=torch.float64)
    assert inverse_cdf(probs, uniform).tolist() == [1, 1, 1, 3, 3, 4, 4]  # never a zero-probability token
    # Rows need not sum to 1, and a u close enough to 1 that u * sum rounds up to the sum stays on the last
    # positive token.
    unnormalised = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
    assert inverse_cdf(unnormalised, torch.tensor([[1 - 2**-53]], dtype=torch.float64)).tolist() == [2]
    assert inverse_cdf(unnormalised, torch.tensor([[0.75]], dtype=torch.float64)).tolist() == [2]
    assert inverse_cdf(unnormalised, torch.tensor([[0.7499]], dtype=torch.float64)).tolist() == [0]


def test_draw_frequencies_and_seeding() -> None:
    probs = torch.softmax(torch.tensor([2.0, -1e9, 0.5, 1.0, -3.0, -1e9]), -1).expand(200_000, 6)
    tokens = draw(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=6).double() / len(tokens)
    assert counts[[1, 5]].sum().item() == 0.0
    # Binomial standard error at p ~ 0.5 and n = 200k is ~0.0011: 0.006 is more than five of them.
    assert torch.allclose(counts, probs[0].double(), atol=0.006)
    again = draw(probs[:50], torch.Generator().manual_seed(0))
    assert torch.equal(again, tokens[:50])  # one uniform per row, in row order: a seed fixes every draw
    other = draw(probs[:50], torch.Generator().manual_seed(1))
    assert not torch.equal(other, tokens[:50])


def test_sampling_params_validation() -> None:
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ConfigError, match="n = 0"):
        SamplingParams(n=0)
