"""Policy-gradient pieces shared by GRPO, REINFORCE++ and PPO: KL estimators, advantages from rewards, the clipped
surrogate and the ways to aggregate it. Pure functions of tensors; `[B, T]` tensors are completions padded on the
right with `mask` True on real completion tokens.

KL estimators (Schulman, http://joschu.net/blog/kl-approx.html), of KL(pi || ref) from tokens sampled from pi,
with log r = log ref(y) - log pi(y):

    k1 = -log r                    unbiased, can be negative
    k2 = (log r)^2 / 2             biased, low variance, always >= 0
    k3 = (r - 1) - log r           unbiased, always >= 0 (what GRPO adds to its loss; TRL's per_token_kl)

Advantages from one scalar reward per completion, completions of one prompt in consecutive groups of G:

    grpo   A_i = r_i - mean(group)                      (DeepSeekMath, https://arxiv.org/abs/2402.03300)
    rloo   A_i = r_i - mean(group without i) = G / (G - 1) (r_i - mean(group))   (Ahmadian et al. 2024)
    then scale_rewards: "group" divides by the group's std, "batch" by the std of all rewards, "none" leaves it
    (Dr. GRPO, https://arxiv.org/abs/2503.20783), with TRL's + 1e-4 and torch.std's unbiased estimate. A group
    whose rewards are all equal gets zero advantage.

Aggregation of the per-token loss l [B, T] (TRL's `loss_type`), written as this micro-batch's share of a global
batch whose size `count` the engine counts first (sequences, or tokens for dapo), so the sum over micro-batches
and ranks is the loss of the whole batch:

    grpo     sum_i (sum_t l_it / |o_i|) / count           a mean over sequences of each sequence's token mean
    bnpo     (sum_it l_it / sum_it 1) * B / count         each micro-batch's token mean (TRL: depends on the split)
    dr_grpo  sum_it l_it / (count * max_completion_length)
    dapo     sum_it l_it / count, count = tokens          the token mean over the whole global batch (DAPO)
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
AdvantageEstimator = Literal["grpo", "rloo"]
RewardScaling = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPS = 1e-4  # TRL's: (r - mean) / (std + 1e-4)


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled tokens' log-probs under pi and under ref."""
    log_ratio = ref_logps - logps  # log r
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k2 or k3")


def group_advantages(rewards: torch.Tensor, group_size: int, *, estimator: AdvantageEstimator = "grpo",
                     scale_rewards: RewardScaling = "group") -> torch.Tensor:
    """Advantages [N] of N = prompts x group_size rewards, each prompt's completions consecutive (see above)."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [prompts * group_size]; got {tuple(rewards.shape)} for groups of {group_size}")
    if group_size < 2:
        raise ValueError(f"a group baseline needs at least 2 completions per prompt; got {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if estimator == "rloo":
        centred = centred * (group_size / (group_size - 1))
    elif estimator != "grpo":
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected grpo or rloo")
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + STD_EPS)
    elif scale_rewards == "batch":
        centred = centred / (rewards.std() + STD_EPS)
    elif scale_rewards != "none":
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected group, batch or none")
    return centred.reshape(-1)


def token_rewards(scores: torch.Tensor, token_kl: torch.Tensor, mask: torch.Tensor, *, kl_coef: float) -> torch.Tensor:
    """Per-token rewards [B, T] of PPO and REINFORCE++: -kl_coef * KL_t on every real token, plus each sequence's
    score [B] on its last real token (where the reward model read the whole completion). Padded positions, and every
    position of an empty row, are 0 whatever `token_kl` holds there."""
    mask = mask.bool()
    rewards = torch.where(mask, -kl_coef * token_kl, 0.0)
    last = mask.long().cumsum(-1).argmax(-1)  # index of each row's last real token (0 for an empty row)
    score = torch.where(mask.any(-1), scores.to(rewards.dtype), 0.0)
    return rewards.scatter_add(1, last[:, None], score[:, None])


def reinforce_pp_advantages(scores: torch.Tensor, token_kl: torch.Tensor, mask: torch.Tensor, *, kl_coef: float
                            ) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, https://arxiv.org/abs/2501.03262): per-token advantages [B, T].

    Token rewards are -kl_coef * KL_t, plus the sequence's score at its last token; each token's return is the sum of
    the rewards from it to the end (no discount); returns are whitened over every real token of the batch (the batch
    baseline: its mean is subtracted, its std divides).
    """
    rewards = token_rewards(scores, token_kl, mask, kl_coef=kl_coef)
    returns = rewards.flip(-1).cumsum(-1).flip(-1) * mask
    valid = returns[mask.bool()]
    return (returns - valid.mean()) / (valid.std() + STD_EPS) * mask


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *, epsilon: float = 0.2,
                      epsilon_high: float | None = None, dual_clip: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, ratio) of the clipped surrogate objective (PPO, https://arxiv.org/abs/1707.06347):

        ratio = exp(logps - old_logps)
        loss  = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)

    `epsilon_high` (DAPO's clip-higher, https://arxiv.org/abs/2503.14476) defaults to `epsilon`. `dual_clip` c > 1
    (Ye et al. 2020, https://arxiv.org/abs/1912.09729) bounds the loss of negative advantages at -c * A, so a token
    whose ratio exploded cannot dominate. `advantages` broadcast against `logps` ([B, 1] for one per sequence).
    """
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    loss = torch.maximum(-ratio * advantages, -ratio.clamp(1 - epsilon, 1 + high) * advantages)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1; got {dual_clip}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss, ratio


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: LossType, *, count: float,
              max_completion_length: int | None = None) -> torch.Tensor:
    """This micro-batch's share of the global batch's loss (see the module docstring); `count` is the global
    number of sequences, or of completion tokens for dapo."""
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / count
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) * mask.shape[0] / count
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type dr_grpo divides by max_completion_length; pass it")
        return masked.sum() / (count * max_completion_length)
    if loss_type == "dapo":
        return masked.sum() / count
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def counts_tokens(loss_type: LossType) -> bool:
    """Whether `aggregate`'s count is completion tokens (dapo) rather than sequences."""
    return loss_type == "dapo"
