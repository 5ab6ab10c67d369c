"""PPO for language models (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; Ouyang et al. 2022): the pure
pieces between a rollout and the optimizer step. Pure functions of tensors plus two small stateful helpers (the
KL controllers and the running reward moments) that a trainer checkpoints through `state_dict`. `[B, T]` tensors
are completions padded on the right with `mask` True on real completion tokens (the EOS token included).

The per-token reward, with the sequence's score on its last real token (`per_token_rewards`):

    r_t = -kl_coef * KL_t + [t = last] * score

GAE (Schulman et al. 2015, https://arxiv.org/abs/1506.02438) backwards over the real tokens, V = 0 after the last
one (`gae`):

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t                          (the value targets)

The value loss clipped around the rollout's values, as TRL and the "N implementation details of RLHF with PPO"
(Huang et al. 2024) have it (`value_loss`):

    0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)

The policy loss is `policy.clipped_surrogate` (with its optional dual clip); `policy_loss` is its masked mean.
Names follow TRL's PPOConfig (`kl_coef`, `kl_estimator`, `cliprange`, `cliprange_value`, `gamma`, `lam`) and the
older PPOTrainer's (`init_kl_coef`, `target`, `horizon`). docs/concepts/ppo.md has the whole derivation.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from alignkit.losses.policy import KLEstimator, clipped_surrogate, kl_estimate, token_rewards

WHITEN_EPS = 1e-8  # TRL's masked_whiten: (x - mean) * rsqrt(var + 1e-8)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is True (over `dim`, or all of them). Masked positions
    contribute nothing, whatever they hold; no real position gives NaN (0 / 0)."""
    mask = mask.bool()
    total = torch.where(mask, values, 0.0)
    if dim is None:
        return total.sum() / mask.sum()
    return total.sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over the real positions; `unbiased` (TRL's default) applies Bessel's n / (n - 1)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = int(mask.sum())
        if count < 2:
            raise ValueError(f"an unbiased variance needs at least 2 real tokens; the mask has {count}. Use a larger "
                             "batch, or whiten over more sequences at once.")
        variance = variance * (count / (count - 1))
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """TRL's `masked_whiten`: (x - mean) / sqrt(var + 1e-8) with the mean and unbiased variance of the real
    positions; `shift_mean=False` adds the mean back (only rescales: how TRL whitens rewards). Padded positions
    come back as 0 (TRL fills them with 0 right after, at both of its call sites)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


def per_token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, *,
                      kl_coef: float, kl_estimator: KLEstimator = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, T], KL [B, T]) of one rollout: KL_t estimates KL(pi || ref) from the sampled tokens' log-probs
    under the rollout policy and the reference (k1 = logp - ref_logp, TRL's default), and the reward is
    -kl_coef * KL_t plus the score [B] on the last real token. Both are 0 at padded positions; a sequence with no
    real token gets no reward at all (its score has no token to land on)."""
    mask = mask.bool()
    kl = torch.where(mask, kl_estimate(logps, ref_logps, kl_estimator), 0.0)
    return token_rewards(scores, kl, mask, kl_coef=kl_coef), kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B, T], returns [B, T]) by generalized advantage estimation (see the module docstring).

    The recursion runs over real tokens only: a masked position is skipped (it neither reads nor resets the
    running A and V), so V after a sequence's last real token is 0 and padding contributes nothing, wherever it
    sits (verl's `compute_gae_advantage_return` skips masked positions the same way). A sequence cut at the length
    limit is treated as finished, as in TRL. Both outputs are 0 at padded positions; returns = advantages + values.
    Call it on detached rollout tensors (it is not meant to be differentiated).
    """
    mask = mask.bool()
    values = torch.where(mask, values, 0.0)  # padded returns come out 0 (a masked step's delta is never read)
    next_value = torch.zeros_like(values[:, 0])  # V of the next real token, 0 past the last  # [B]
    next_advantage = torch.zeros_like(values[:, 0])  # [B]
    reversed_advantages = []
    for t in reversed(range(values.shape[1])):
        real = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        reversed_advantages.append(torch.where(real, advantage, 0.0))
        next_value = torch.where(real, values[:, t], next_value)
        next_advantage = torch.where(real, advantage, next_advantage)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *,
                       cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, clipped) of the clipped value objective: 0.5 * max((V - R)^2, (V_clip - R)^2) with
    V_clip = clip(V, V_old - c, V_old + c). `clipped` marks the tokens where the clipped term is the larger one
    (TRL's `val/clipfrac_avg`); there the gradient is 0 whenever V is outside the band. Reduce with `aggregate` (a
    global token mean is "dapo") or `value_loss` (TRL's per-batch masked mean)."""
    if not cliprange_value > 0:
        raise ValueError(f"cliprange_value must be > 0; got {cliprange_value}")
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped_loss, clipped_loss), clipped_loss > unclipped_loss


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clipfrac): TRL's PPO value loss, the masked mean of `clipped_value_loss` over the real tokens, and
    the share of real tokens where the clipped term won."""
    per_token, clipped = clipped_value_loss(values, old_values, returns, cliprange_value=cliprange_value)
    return masked_mean(per_token, mask), masked_mean(clipped.to(per_token.dtype), mask)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                cliprange: float = 0.2, dual_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clipfrac): TRL's PPO policy loss, the masked mean of `clipped_surrogate` (per-token advantages
    [B, T]; `dual_clip` c > 1 caps the loss of a negative advantage at -c * A), and the share of real tokens where
    the clipped ratio won (TRL's `policy/clipfrac_avg`: A * ratio > A * clip(ratio), the tokens with no gradient)."""
    per_token, ratio = clipped_surrogate(logps, old_logps, advantages, epsilon=cliprange, dual_clip=dual_clip)
    with torch.no_grad():
        clipped = advantages * ratio > advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    return masked_mean(per_token, mask), masked_mean(clipped.to(per_token.dtype), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over the real tokens: 1 for a perfect critic, 0 for one that predicts the mean,
    negative for worse; NaN when the returns do not vary. (Bessel's correction cancels in the ratio.)"""
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    return torch.where(var_returns > 0, 1 - var_residual / var_returns, torch.nan)


class FixedKLController:
    """A constant KL coefficient (TRL's default `kl_coef`), with the same interface as the adaptive one."""

    def __init__(self, kl_coef: float) -> None:
        if not (math.isfinite(kl_coef) and kl_coef >= 0):
            raise ValueError(f"kl_coef must be a finite number >= 0; got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current: float | torch.Tensor, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 (section 2.2; their `lm-human-preferences` code and TRL's older PPOTrainer): steer the
    KL coefficient so the policy's KL to the reference approaches `target`,

        e     = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    where KL is the rollout's mean per-sequence KL (the sum over its tokens) and n_steps the number of sequences
    in the rollout (over all ranks). The clip bounds how fast beta moves whatever the KL does."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if not (math.isfinite(init_kl_coef) and init_kl_coef > 0):
            raise ValueError(f"init_kl_coef must be > 0 for the adaptive controller to scale it; got {init_kl_coef}")
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"target (the KL to steer toward, in nats per sequence) must be > 0; got {target}")
        if not (math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"horizon must be > 0; got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current: float | torch.Tensor, n_steps: int) -> None:
        proportional_error = min(max(float(current) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and standard deviation of every score seen so far, for reward normalisation (TRL's
    `use_score_scaling` / `use_score_norm`). Batches merge by Chan et al.'s parallel update (the one in TRL's and
    stable-baselines3's RunningMeanStd), in float64:

        delta = mean_b - mean,  n' = n + n_b
        M2'   = var * n + var_b * n_b + delta^2 * n * n_b / n'
        mean' = mean + delta * n_b / n',  var' = M2' / n'          (population variance)

    `std` is the unbiased standard deviation over all seen values (TRL's), 1 before two values were seen. Under
    several processes, gather the scores of all ranks before `update` so every rank keeps the same moments.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 0

    @property
    def std(self) -> float:
        if self.count < 2:
            return 1.0
        return math.sqrt(self.var * self.count / (self.count - 1))

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Merge a batch of scores; returns the batch's (mean, unbiased std), NaN std for a single value."""
        xs = xs.detach().to(torch.float64).flatten()
        n = xs.numel()
        if n == 0:
            return math.nan, math.nan
        batch_var, batch_mean = (float(v) for v in torch.var_mean(xs, unbiased=False))
        delta = batch_mean - self.mean
        total = self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total
        return batch_mean, math.sqrt(batch_var * n / (n - 1)) if n > 1 else math.nan

    def normalize(self, scores: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
        """TRL's score scaling: (scores - mean) / (std + eps) with `shift_mean` (use_score_norm), scores / (std +
        eps) without; eps is the machine epsilon of the scores' dtype."""
        scale = self.std + torch.finfo(scores.dtype).eps
        return (scores - self.mean) / scale if shift_mean else scores / scale

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
