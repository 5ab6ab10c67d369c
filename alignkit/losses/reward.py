"""Bradley-Terry loss for reward models trained on preference pairs (InstructGPT, https://arxiv.org/abs/2203.02155)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of "chosen beats rejected" under Bradley-Terry, as TRL's RewardTrainer computes it.

        loss = mean_i[ -logsigmoid(r_c[i] - r_l[i] - margin[i]) ]
               + center_rewards_coefficient * mean_i[ (r_c[i] + r_l[i])^2 ]

    `margin` [B] (Llama 2, https://arxiv.org/abs/2307.09288) asks for a larger reward gap on pairs the annotators
    rated as clearly different. The centering term (Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244)
    pulls the pair's rewards toward mean zero; Bradley-Terry only sees differences, so without it the offset
    drifts freely. Scalars in, a scalar loss out.

    Metrics (TRL's names, detached means): `accuracy` = fraction with r_c > r_l (strictly; ties count as wrong),
    `margin` = mean(r_c - r_l) (the `margin` argument is not subtracted), `mean_reward` / `min_reward` /
    `max_reward` over all 2B rewards, `rewards/chosen`, `rewards/rejected`.

    Example: r_c = [2, 0], r_l = [1, 1]. Differences [1, -1]:
    loss = (-logsigmoid(1) - logsigmoid(-1)) / 2 = (0.313262 + 1.313262) / 2 = 0.813262; accuracy 0.5, margin 0.
    With margin [1, 0]: differences [0, -1], loss = (0.693147 + 1.313262) / 2 = 1.003205.
    With center_rewards_coefficient 0.01 (no margin): + 0.01 * (3^2 + 1^2) / 2 = 0.05 -> 0.863262.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"bradley_terry_loss: chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
            f"{tuple(rejected_rewards.shape)} must have the same shape [num_pairs]."
        )
    difference = chosen_rewards - rejected_rewards
    target_gap = difference if margin is None else difference - margin
    loss = -F.logsigmoid(target_gap).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()

    with torch.no_grad():
        all_rewards = torch.cat([chosen_rewards.reshape(-1), rejected_rewards.reshape(-1)]).float()
        metrics = {
            "accuracy": (difference > 0).float().mean(),
            "margin": difference.float().mean(),
            "mean_reward": all_rewards.mean(),
            "min_reward": all_rewards.min(),
            "max_reward": all_rewards.max(),
            "rewards/chosen": chosen_rewards.float().mean(),
            "rewards/rejected": rejected_rewards.float().mean(),
        }
    return loss, metrics
