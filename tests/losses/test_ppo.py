"""PPO pieces against hand-computed numbers and plain Python re-implementations (loops over floats): masked
statistics and whitening, per-token rewards, GAE, the clipped value and policy losses (values and gradients),
explained variance, the KL controllers and the running reward moments. Padded positions are filled with garbage
throughout: results must not change and their gradients must be 0."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from alignkit.losses.policy import aggregate
from alignkit.losses.ppo import (
    WHITEN_EPS,
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clipped_value_loss,
    explained_variance,
    gae,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)
from tests.losses.test_policy import plain_surrogate

LENGTHS = [5, 1, 0, 3, 7, 7]  # an empty row, a one-token row and full rows
T = 7


def ragged(seed: int, lengths: list[int] = LENGTHS, fill: float = 1e6) -> tuple[torch.Tensor, torch.Tensor]:
    """A random [B, T] float64 tensor and its right-padded mask; padding holds `fill` garbage."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(len(lengths), T, generator=g, dtype=torch.float64)
    return x.masked_fill(~mask, fill), mask


def real(x: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    """The real entries of each row, as Python floats."""
    return [[float(v) for v, m in zip(row, mrow) if m] for row, mrow in zip(x, mask)]


def plain_mean_var(xs: list[float], unbiased: bool) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    return mean, sum((x - mean) ** 2 for x in xs) / (len(xs) - (1 if unbiased else 0))


def test_masked_statistics_and_whitening_match_plain() -> None:
    x, mask = ragged(0)
    flat = [v for row in real(x, mask) for v in row]
    mean, var = plain_mean_var(flat, unbiased=True)
    assert float(masked_mean(x, mask)) == pytest.approx(mean, rel=1e-12)
    assert float(masked_var(x, mask)) == pytest.approx(var, rel=1e-12)
    assert float(masked_var(x, mask, unbiased=False)) == pytest.approx(var * (len(flat) - 1) / len(flat), rel=1e-12)
    rows = masked_mean(x, mask, dim=1)
    for i, values in enumerate(real(x, mask)):
        if values:
            assert float(rows[i]) == pytest.approx(sum(values) / len(values), rel=1e-12)
        else:
            assert math.isnan(float(rows[i]))  # 0 / 0: no real token
    for shift_mean in (True, False):
        white = masked_whiten(x, mask, shift_mean=shift_mean)
        for i, values in enumerate(real(x, mask)):
            for t, v in enumerate(values):
                expected = (v - mean) / math.sqrt(var + WHITEN_EPS) + (0.0 if shift_mean else mean)
                assert float(white[i, t]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert torch.equal(white[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    whitened = real(masked_whiten(x, mask), mask)
    assert plain_mean_var([v for row in whitened for v in row], unbiased=True) == pytest.approx((0.0, 1.0), abs=1e-7)
    one = torch.zeros_like(mask)
    one[0, 0] = True
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        masked_whiten(x, one)


def plain_rewards(score: float, logps: list[float], refs: list[float], kl_coef: float, estimator: str
                  ) -> tuple[list[float], list[float]]:
    kls = []
    for lp, ref in zip(logps, refs):
        log_r = ref - lp
        kls.append({"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.exp(log_r) - 1 - log_r}[estimator])
    rewards = [-kl_coef * k for k in kls]
    if rewards:
        rewards[-1] += score
    return rewards, kls


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_per_token_rewards_match_plain(estimator: str) -> None:
    logps, mask = ragged(1)
    refs, _ = ragged(2, fill=-1e3)
    scores = torch.tensor([1.5, -0.5, 2.0, 0.25, -1.0, 3.0], dtype=torch.float64)
    rewards, kl = per_token_rewards(scores, logps, refs, mask, kl_coef=0.1, kl_estimator=estimator)  # type: ignore[arg-type]
    for i, (lp, ref) in enumerate(zip(real(logps, mask), real(refs, mask))):
        expected_rewards, expected_kl = plain_rewards(float(scores[i]), lp, ref, 0.1, estimator)
        assert real(rewards, mask)[i] == pytest.approx(expected_rewards, rel=1e-12, abs=1e-12)
        assert real(kl, mask)[i] == pytest.approx(expected_kl, rel=1e-12, abs=1e-12)
    # Padding (and the whole empty row, whose score has no token to land on) is exactly 0.
    assert torch.equal(rewards[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    assert torch.equal(kl[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    assert torch.equal(rewards[2], torch.zeros(T, dtype=torch.float64))
    # Different garbage in the padding: identical results.
    other, _ = per_token_rewards(scores, logps.masked_fill(~mask, -3.0), refs.masked_fill(~mask, 7.0), mask,
                                 kl_coef=0.1, kl_estimator=estimator)  # type: ignore[arg-type]
    assert torch.equal(other, rewards)


def test_per_token_rewards_by_hand() -> None:
    """logp [-1, -2], ref [-1.5, -1]: k1 = [0.5, -1]; kl_coef 0.2 -> [-0.1, 0.2]; score 3 on the last token."""
    rewards, kl = per_token_rewards(torch.tensor([3.0]), torch.tensor([[-1.0, -2.0, 0.0]]),
                                    torch.tensor([[-1.5, -1.0, 0.0]]), torch.tensor([[True, True, False]]),
                                    kl_coef=0.2)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 3.2, 0.0]]))


def test_padding_may_hold_inf_and_nan() -> None:
    """Padded log-probs are often -inf or NaN (never computed): nothing may leak out of the padding."""
    logps, mask = ragged(16)
    refs, _ = ragged(17)
    values, _ = ragged(18)
    scores = torch.arange(6, dtype=torch.float64)
    clean = per_token_rewards(scores, logps, refs, mask, kl_coef=0.1, kl_estimator="k3")
    dirty = per_token_rewards(scores, logps.masked_fill(~mask, torch.nan), refs.masked_fill(~mask, -torch.inf), mask,
                              kl_coef=0.1, kl_estimator="k3")
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])
    nan_values = values.masked_fill(~mask, torch.nan)
    assert torch.equal(gae(dirty[0], nan_values, mask, gamma=1.0, lam=0.95)[0],
                       gae(clean[0], values, mask, gamma=1.0, lam=0.95)[0])
    assert float(masked_mean(nan_values, mask)) == float(masked_mean(values, mask))
    assert torch.equal(masked_whiten(nan_values, mask), masked_whiten(values, mask))
    assert float(explained_variance(nan_values, values, mask)) == pytest.approx(1.0)


def plain_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """GAE over one sequence's real tokens, by the definition: A_t = sum_l (gamma lam)^l delta_{t+l}."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    advantages = [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n)) for t in range(n)]
    return advantages, [a + v for a, v in zip(advantages, values)]


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_plain(gamma: float, lam: float) -> None:
    rewards, mask = ragged(3)
    values, _ = ragged(4)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for i, (r, v) in enumerate(zip(real(rewards, mask), real(values, mask))):
        expected_advantages, expected_returns = plain_gae(r, v, gamma, lam)
        assert real(advantages, mask)[i] == pytest.approx(expected_advantages, rel=1e-12, abs=1e-12)
        assert real(returns, mask)[i] == pytest.approx(expected_returns, rel=1e-12, abs=1e-12)
    zeros = torch.zeros(int((~mask).sum()), dtype=torch.float64)
    assert torch.equal(advantages[~mask], zeros) and torch.equal(returns[~mask], zeros)
    other = gae(rewards.masked_fill(~mask, -5.0), values.masked_fill(~mask, 9.0), mask, gamma=gamma, lam=lam)
    assert torch.equal(other[0], advantages) and torch.equal(other[1], returns)


def test_gae_by_hand() -> None:
    """Rewards [0, 0, 1], values [0.5, 0.2, 0.4]. gamma = lam = 1: A_t = reward-to-go - V_t = [0.5, 0.8, 0.6].
    lam = 0: A_t = r_t + V_{t+1} - V_t = [-0.3, 0.2, 0.6] (V after the last token is 0)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.2, 0.4, 123.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.8, 0.6, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64))
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    torch.testing.assert_close(advantages, torch.tensor([[-0.3, 0.2, 0.6, 0.0]], dtype=torch.float64))


def test_gae_skips_masked_positions_anywhere() -> None:
    """A masked position in the middle (or left padding) is skipped: the recursion links the real tokens on either
    side, so the result equals GAE on the real tokens packed together."""
    rewards, _ = ragged(5, [T])
    values, _ = ragged(6, [T])
    holes = torch.tensor([[False, True, True, False, True, False, True]])
    advantages, returns = gae(rewards, values, holes, gamma=0.95, lam=0.9)
    packed_advantages, packed_returns = plain_gae(real(rewards, holes)[0], real(values, holes)[0], 0.95, 0.9)
    assert real(advantages, holes)[0] == pytest.approx(packed_advantages, rel=1e-12)
    assert real(returns, holes)[0] == pytest.approx(packed_returns, rel=1e-12)
    assert float(advantages[0, 0]) == float(advantages[0, 3]) == float(advantages[0, 5]) == 0.0


def plain_value_loss(v: float, old: float, ret: float, c: float) -> tuple[float, float, bool]:
    """(loss, d loss / d v, clipped) one token at a time."""
    clipped_v = min(max(v, old - c), old + c)
    unclipped_loss, clipped_loss = (v - ret) ** 2, (clipped_v - ret) ** 2
    if unclipped_loss >= clipped_loss:  # inside the band the two are equal and the gradient is (v - R)
        return 0.5 * unclipped_loss, v - ret, False
    return 0.5 * clipped_loss, 0.0, True  # the clipped term is constant in v outside the band


@pytest.mark.parametrize("cliprange_value", [0.2, 0.5])
def test_value_loss_matches_plain_values_and_gradients(cliprange_value: float) -> None:
    old, mask = ragged(7)
    g = torch.Generator().manual_seed(8)
    values = (old + torch.randn(old.shape, generator=g, dtype=torch.float64) * 0.4).requires_grad_(True)
    returns, _ = ragged(9)
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=cliprange_value)
    loss.backward()
    loss = loss.detach()
    tokens = [(i, t) for i in range(len(LENGTHS)) for t in range(LENGTHS[i])]
    plain = {(i, t): plain_value_loss(float(values[i, t].detach()), float(old[i, t]), float(returns[i, t]), cliprange_value)
             for i, t in tokens}
    assert float(loss) == pytest.approx(sum(p[0] for p in plain.values()) / len(tokens), rel=1e-12)
    assert float(clipfrac) == pytest.approx(sum(p[2] for p in plain.values()) / len(tokens), abs=1e-15)
    assert 0 < float(clipfrac) < 1  # both branches are exercised
    for (i, t), (_, grad, _) in plain.items():
        assert float(values.grad[i, t]) == pytest.approx(grad / len(tokens), rel=1e-12, abs=1e-15), (i, t)
    assert torch.equal(values.grad[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    # The per-token form reduced by aggregate's global token mean ("dapo") is the same loss.
    per_token, _ = clipped_value_loss(values.detach(), old, returns, cliprange_value=cliprange_value)
    assert float(aggregate(per_token, mask, "dapo", count=len(tokens))) == pytest.approx(float(loss), rel=1e-12)


def test_value_loss_by_hand() -> None:
    """old 0, c 0.2, return 1. V = 0.1 (inside the band): 0.5 * 0.81 = 0.405. V = 0.5: unclipped 0.25, clipped
    (0.2 - 1)^2 = 0.64 wins: 0.32, no gradient. V = -0.5: unclipped 2.25 > clipped 1.44: 1.125, gradient -1.5."""
    values = torch.tensor([[0.1, 0.5, -0.5]], dtype=torch.float64, requires_grad=True)
    per_token, clipped = clipped_value_loss(values, torch.zeros(1, 3, dtype=torch.float64),
                                            torch.ones(1, 3, dtype=torch.float64), cliprange_value=0.2)
    per_token.sum().backward()
    torch.testing.assert_close(per_token.detach(), torch.tensor([[0.405, 0.32, 1.125]], dtype=torch.float64))
    assert clipped.tolist() == [[False, True, False]]
    torch.testing.assert_close(values.grad, torch.tensor([[-0.9, 0.0, -1.5]], dtype=torch.float64))


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_matches_plain_values_and_gradients(dual_clip: float | None) -> None:
    old, mask = ragged(10)
    old = -old.abs()
    g = torch.Generator().manual_seed(11)
    logps = (old + torch.randn(old.shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    logps.data[0, 0] = old[0, 0] + math.log(8.0)  # ratio 8: the dual clip bites for the negative advantage below
    advantages, _ = ragged(12)
    advantages[0, 0] = -1.5
    loss, clipfrac = policy_loss(logps, old, advantages, mask, cliprange=0.2, dual_clip=dual_clip)
    loss.backward()
    loss = loss.detach()
    tokens = [(i, t) for i in range(len(LENGTHS)) for t in range(LENGTHS[i])]
    total, clipped = 0.0, 0
    for i, t in tokens:
        lp, o, a = float(logps[i, t].detach()), float(old[i, t]), float(advantages[i, t])
        value, grad = plain_surrogate(lp, o, a, 0.2, 0.2, dual_clip)
        total += value
        ratio = math.exp(lp - o)
        clipped += a * ratio > a * min(max(ratio, 0.8), 1.2)
        assert float(logps.grad[i, t]) == pytest.approx(grad / len(tokens), rel=1e-12, abs=1e-15), (i, t)
    assert float(loss) == pytest.approx(total / len(tokens), rel=1e-12)
    assert float(clipfrac) == pytest.approx(clipped / len(tokens), abs=1e-15) and 0 < clipped < len(tokens)
    assert torch.equal(logps.grad[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    # The exploded token: loss 8 * 1.5 = 12 without the dual clip, capped at -c * A = 4.5 with it.
    capped = plain_surrogate(float(logps[0, 0].detach()), float(old[0, 0]), -1.5, 0.2, 0.2, dual_clip)[0]
    assert capped == pytest.approx(12.0 if dual_clip is None else 4.5, rel=1e-9)


def test_explained_variance() -> None:
    returns, mask = ragged(13)
    values, _ = ragged(14)
    r = [v for row in real(returns, mask) for v in row]
    residual = [a - b for a, b in zip(r, [v for row in real(values, mask) for v in row])]
    expected = 1 - plain_mean_var(residual, unbiased=False)[1] / plain_mean_var(r, unbiased=False)[1]
    assert float(explained_variance(values, returns, mask)) == pytest.approx(expected, rel=1e-12)
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0, abs=1e-15)  # a perfect critic
    mean = torch.full_like(returns, float(masked_mean(returns, mask)))
    assert float(explained_variance(mean, returns, mask)) == pytest.approx(0.0, abs=1e-12)  # predicts the mean
    assert math.isnan(float(explained_variance(values, torch.ones_like(values), mask)))  # returns do not vary


def plain_adaptive(value: float, current: float, target: float, horizon: float, n_steps: int) -> float:
    error = min(max(current / target - 1, -0.2), 0.2)
    return value * (1 + error * n_steps / horizon)


def test_adaptive_kl_controller_moves_toward_target_and_clips() -> None:
    """target 6, horizon 10000, 64 sequences per step. KL 6.6 (+10%): x (1 + 0.1 * 64 / 10000). KL 60 (+900%) is
    clipped to +20%: x 1.00128. KL 0 (-100%) to -20%: x 0.99872. KL at the target: unchanged."""
    for current, factor in ((6.6, 1 + 0.1 * 64 / 10000), (60.0, 1.00128), (0.0, 0.99872), (6.0, 1.0)):
        controller = AdaptiveKLController(0.2, target=6.0, horizon=10000)
        controller.update(current, 64)
        assert controller.value == pytest.approx(0.2 * factor, rel=1e-12), current
    controller = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    expected = 0.2
    for current in (12.0, 9.0, 7.0, 3.0, 1.0, 6.5):
        before = controller.value
        controller.update(torch.tensor(current), 32)  # a tensor KL works too
        expected = plain_adaptive(expected, current, 6.0, 1000, 32)
        assert controller.value == pytest.approx(expected, rel=1e-12)
        assert (controller.value > before) == (current > 6.0)  # KL above target: penalise more
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.2, target=0.0, horizon=1000)


def test_kl_controllers_survive_a_state_dict_round_trip() -> None:
    """Through JSON (what a trainer state file holds): a resumed controller continues exactly."""
    whole = AdaptiveKLController(0.1, target=4.0, horizon=500)
    first = AdaptiveKLController(0.1, target=4.0, horizon=500)
    kls = [9.0, 8.0, 2.0, 5.0, 1.0, 4.5]
    for kl in kls[:3]:
        whole.update(kl, 16)
        first.update(kl, 16)
    resumed = AdaptiveKLController(0.1, target=4.0, horizon=500)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.value == first.value != 0.1
    for kl in kls[3:]:
        whole.update(kl, 16)
        resumed.update(kl, 16)
    assert resumed.value == whole.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    again = FixedKLController(0.05)
    again.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert again.value == 0.05


def test_running_moments_equal_numpy_over_everything_seen() -> None:
    g = torch.Generator().manual_seed(15)
    batches = [torch.randn(n, generator=g) * 3 + 2 for n in (8, 1, 5, 32, 2)]
    moments = RunningMoments()
    assert moments.std == 1.0 and moments.mean == 0.0  # nothing seen: the identity scaling
    seen: list[float] = []
    for i, batch in enumerate(batches):
        batch_mean, batch_std = moments.update(batch)
        seen += batch.double().tolist()
        assert moments.count == len(seen)
        assert moments.mean == pytest.approx(np.mean(seen), rel=1e-12)
        if len(seen) > 1:
            assert moments.std == pytest.approx(np.std(seen, ddof=1), rel=1e-12)
        assert batch_mean == pytest.approx(float(batch.double().mean()), rel=1e-12)
        if len(batch) > 1:
            assert batch_std == pytest.approx(float(batch.double().std()), rel=1e-12)
        else:
            assert math.isnan(batch_std)
        if i == 2:  # resume half way through, through JSON
            resumed = RunningMoments()
            resumed.load_state_dict(json.loads(json.dumps(moments.state_dict())))
    for batch in batches[3:]:
        resumed.update(batch)
    assert resumed.state_dict() == moments.state_dict()
    scores = torch.tensor([1.0, 4.0, -2.0])
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(moments.normalize(scores),
                               (scores - np.mean(seen)) / (np.std(seen, ddof=1) + eps), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(moments.normalize(scores, shift_mean=False),
                               scores / (np.std(seen, ddof=1) + eps), rtol=1e-6, atol=1e-7)
