"""Policy-gradient pieces against hand-computed numbers and plain Python re-implementations: KL estimators,
group advantages, REINFORCE++ returns, the clipped surrogate (values and gradients), and loss aggregation
(including its invariance to how the global batch is split)."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.policy import (
    STD_EPS,
    aggregate,
    clipped_surrogate,
    group_advantages,
    kl_estimate,
    reinforce_pp_advantages,
)


def test_kl_estimators_by_hand_and_gradients() -> None:
    """logp = -1, ref = -2: log r = -1; k1 = 1, k2 = 0.5, k3 = e^-1 + 1 - 1 = 0.367879.
    d/dlogp: k1 1, k2 -(ref - logp) = 1, k3 1 - e^(ref - logp) = 0.632121."""
    for estimator, value, grad in (("k1", 1.0, 1.0), ("k2", 0.5, 1.0), ("k3", math.exp(-1), 1 - math.exp(-1))):
        logp = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
        kl = kl_estimate(logp, torch.tensor([-2.0], dtype=torch.float64), estimator)  # type: ignore[arg-type]
        kl.sum().backward()
        assert float(kl.detach()) == pytest.approx(value, abs=1e-15)
        assert float(logp.grad) == pytest.approx(grad, abs=1e-15)
    same = torch.tensor([-0.3, -4.0])
    for estimator in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(same, same, estimator), torch.zeros(2))  # type: ignore[arg-type]


def test_k1_and_k3_are_unbiased_and_k3_nonnegative() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    exact = float((p * (p.log() - q.log())).sum())
    samples = torch.multinomial(p, 400_000, replacement=True, generator=g)
    logp, logq = p.log()[samples], q.log()[samples]
    for estimator in ("k1", "k3"):
        assert float(kl_estimate(logp, logq, estimator).mean()) == pytest.approx(exact, rel=0.02)  # type: ignore[arg-type]
    assert float(kl_estimate(logp, logq, "k3").min()) >= 0


def test_group_advantages_by_hand() -> None:
    """Group 1: rewards [1, 0, 1, 1], mean 0.75, unbiased std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5. Group 2: all 0."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    grpo = group_advantages(rewards, 4)
    expected = torch.tensor([0.25, -0.75, 0.25, 0.25], dtype=torch.float64) / (0.5 + STD_EPS)
    torch.testing.assert_close(grpo[:4], expected, atol=1e-15, rtol=0)
    assert torch.equal(grpo[4:], torch.zeros(4, dtype=torch.float64))  # identical rewards: no signal
    # RLOO: r_i minus the mean of the others; for the first completion 1 - (0 + 1 + 1) / 3 = 1 / 3.
    rloo = group_advantages(rewards, 4, estimator="rloo", scale_rewards="none")
    assert float(rloo[0]) == pytest.approx(1 / 3, abs=1e-15) and float(rloo[1]) == pytest.approx(-1.0, abs=1e-15)
    # Dr. GRPO: no std; batch scaling divides by the std of all eight rewards.
    torch.testing.assert_close(group_advantages(rewards, 4, scale_rewards="none")[:4], expected * (0.5 + STD_EPS))
    batch = group_advantages(rewards, 4, scale_rewards="batch")
    torch.testing.assert_close(batch[:4], expected * (0.5 + STD_EPS) / (float(rewards.std()) + STD_EPS))
    with pytest.raises(ValueError, match="at least 2 completions"):
        group_advantages(rewards, 1)


def plain_surrogate(logp: float, old: float, adv: float, eps: float, high: float, dual: float | None
                    ) -> tuple[float, float]:
    """(loss, d loss / d logp) one token at a time."""
    ratio = math.exp(logp - old)
    clipped = min(max(ratio, 1 - eps), 1 + high)
    unclipped_loss, clipped_loss = -ratio * adv, -clipped * adv
    loss, grad = (unclipped_loss, -adv * ratio) if unclipped_loss >= clipped_loss else (clipped_loss, 0.0)
    if clipped_loss == unclipped_loss and clipped != ratio:
        grad = 0.0
    if dual is not None and adv < 0 and -dual * adv < loss:
        loss, grad = -dual * adv, 0.0
    return loss, grad


@pytest.mark.parametrize(("eps", "high", "dual"), [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 3.0)])
def test_clipped_surrogate_matches_plain_values_and_gradients(eps: float, high: float, dual: float | None) -> None:
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(4, 7, generator=g, dtype=torch.float64) * 0.6).requires_grad_(True)
    logp.data[0, 0] = old[0, 0] + math.log(8.0)  # a ratio of 8, where the dual clip bites for a negative advantage
    adv = torch.tensor([[-1.5], [0.7], [-0.2], [2.0]], dtype=torch.float64)
    loss, ratio = clipped_surrogate(logp, old, adv, epsilon=eps, epsilon_high=high, dual_clip=dual)
    loss.sum().backward()
    for i in range(4):
        for t in range(7):
            value, grad = plain_surrogate(float(logp[i, t].detach()), float(old[i, t]), float(adv[i, 0]), eps, high, dual)
            assert float(loss[i, t].detach()) == pytest.approx(value, rel=1e-12, abs=1e-12), (i, t)
            assert float(logp.grad[i, t]) == pytest.approx(grad, rel=1e-12, abs=1e-12), (i, t)
    torch.testing.assert_close(ratio, torch.exp(logp.detach() - old))


def test_ratio_one_at_the_rollout_policy() -> None:
    """At the policy that sampled (old == new) the loss is -A per token and the gradient -A."""
    logp = torch.tensor([[-0.5, -1.5]], dtype=torch.float64, requires_grad=True)
    loss, ratio = clipped_surrogate(logp, logp.detach(), torch.tensor([[0.8]], dtype=torch.float64))
    loss.sum().backward()
    assert torch.equal(ratio, torch.ones(1, 2, dtype=torch.float64))
    torch.testing.assert_close(logp.grad, torch.full((1, 2), -0.8, dtype=torch.float64))


def plain_aggregate(rows: list[list[float]], lengths: list[int], loss_type: str, max_len: int) -> float:
    tokens = [row[:n] for row, n in zip(rows, lengths)]
    if loss_type == "grpo":
        return sum(sum(t) / len(t) for t in tokens) / len(tokens)
    if loss_type == "bnpo":
        return sum(sum(t) for t in tokens) / sum(lengths)
    if loss_type == "dr_grpo":
        return sum(sum(t) for t in tokens) / (len(tokens) * max_len)
    return sum(sum(t) for t in tokens) / sum(lengths)  # dapo


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_aggregation_by_hand_and_split_invariance(loss_type: str) -> None:
    g = torch.Generator().manual_seed(2)
    per_token = torch.randn(6, 5, generator=g, dtype=torch.float64)
    lengths = [5, 1, 3, 4, 2, 5]
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    per_token = per_token.masked_fill(~mask, 1e6)  # padding must contribute nothing
    count = float(mask.sum()) if loss_type == "dapo" else 6.0
    whole = aggregate(per_token, mask, loss_type, count=count, max_completion_length=5)  # type: ignore[arg-type]
    expected = plain_aggregate(per_token.tolist(), lengths, loss_type, 5)
    assert float(whole) == pytest.approx(expected, rel=1e-12)
    # Three micro-batches of two, each divided by the global count: the same loss (bnpo: TRL's mean of per-micro-
    # batch token means instead).
    parts = [aggregate(per_token[i : i + 2], mask[i : i + 2], loss_type, count=count, max_completion_length=5)  # type: ignore[arg-type]
             for i in (0, 2, 4)]
    if loss_type == "bnpo":
        means = [plain_aggregate(per_token[i : i + 2].tolist(), lengths[i : i + 2], "bnpo", 5) for i in (0, 2, 4)]
        assert float(sum(parts)) == pytest.approx(sum(means) / 3, rel=1e-12)
    else:
        assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-12)


def test_reinforce_pp_returns_by_hand() -> None:
    """Two sequences (lengths 3 and 2), kl_coef 0.5. Token rewards -0.5 * KL, score added at the last token;
    returns are suffix sums, then whitened over the five real tokens."""
    kl = torch.tensor([[0.2, 0.4, 0.6], [1.0, 0.0, 9.9]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    scores = torch.tensor([1.0, -1.0], dtype=torch.float64)
    advantages = reinforce_pp_advantages(scores, kl, mask, kl_coef=0.5)
    rewards = [[-0.1, -0.2, -0.3 + 1.0], [-0.5, 0.0 - 1.0]]
    returns = [[sum(r[t:]) for t in range(len(r))] for r in rewards]
    flat = [x for row in returns for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1))
    for i, row in enumerate(returns):
        for t, value in enumerate(row):
            assert float(advantages[i, t]) == pytest.approx((value - mean) / (std + STD_EPS), rel=1e-12)
    assert float(advantages[1, 2]) == 0.0
