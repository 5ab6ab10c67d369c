"""bradley_terry_loss: hand-computed values (docstring), gradients, and parity with TRL's RewardTrainer."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignkit.losses import bradley_terry_loss

CHOSEN = torch.tensor([2.0, 0.0])
REJECTED = torch.tensor([1.0, 1.0])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # = -logsigmoid(-x)


def test_docstring_example() -> None:
    loss, metrics = bradley_terry_loss(CHOSEN, REJECTED)
    assert abs(loss.item() - 0.813262) < 1e-6
    assert abs(loss.item() - (softplus(-1) + softplus(1)) / 2) < 1e-6
    expected = {
        "accuracy": 0.5, "margin": 0.0, "mean_reward": 1.0, "min_reward": 0.0, "max_reward": 2.0,
        "rewards/chosen": 1.0, "rewards/rejected": 1.0,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert abs(metrics[key].item() - value) < 1e-6, key


def test_margin_and_centering() -> None:
    loss, metrics = bradley_terry_loss(CHOSEN, REJECTED, margin=torch.tensor([1.0, 0.0]))
    assert abs(loss.item() - 1.003205) < 1e-6
    assert abs(loss.item() - (math.log(2) + softplus(1)) / 2) < 1e-6
    assert metrics["margin"].item() == 0.0  # the logged margin is r_c - r_l, not minus the target margin
    loss, _ = bradley_terry_loss(CHOSEN, REJECTED, center_rewards_coefficient=0.01)
    assert abs(loss.item() - 0.863262) < 1e-6
    loss, _ = bradley_terry_loss(
        CHOSEN, REJECTED, margin=torch.tensor([1.0, 0.0]), center_rewards_coefficient=0.01
    )
    assert abs(loss.item() - 1.053205) < 1e-6


def test_gradient_widens_the_gap_and_centering_pulls_to_zero() -> None:
    chosen = torch.tensor([3.0]).requires_grad_()
    rejected = torch.tensor([3.0]).requires_grad_()
    bradley_terry_loss(chosen, rejected)[0].backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert abs(chosen.grad.item() + 0.5) < 1e-6 and abs(rejected.grad.item() - 0.5) < 1e-6  # -sigmoid(0), +sigmoid(0)
    chosen.grad, rejected.grad = None, None
    bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.1)[0].backward()
    # + 0.1 * d/dr (r_c + r_l)^2 = 0.1 * 2 * 6 = 1.2 on both
    assert abs(chosen.grad.item() - 0.7) < 1e-6 and abs(rejected.grad.item() - 1.7) < 1e-6


def test_ties_do_not_count_as_accurate() -> None:
    _, metrics = bradley_terry_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
    assert metrics["accuracy"].item() == 0.5


def test_matches_trl_reward_trainer() -> None:
    """TRL's RewardTrainer.compute_loss, run as an unbound function on a stub trainer whose model returns scores."""
    reward_trainer = pytest.importorskip("trl.trainer.reward_trainer")
    chosen, rejected = torch.randn(6), torch.randn(6)
    margin = torch.rand(6)

    def stub_model(**_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))

    stub_model.training = True  # type: ignore[attr-defined]
    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(
        model=stub_model, accelerator=accelerator, args=SimpleNamespace(center_rewards_coefficient=0.01),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"attention_mask": torch.ones(12, 3, dtype=torch.long), "margin": margin}
    theirs = reward_trainer.RewardTrainer.compute_loss(stub, stub_model, inputs)
    ours, metrics = bradley_terry_loss(chosen, rejected, margin=margin, center_rewards_coefficient=0.01)
    assert abs(ours.item() - theirs.item()) < 1e-6
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert abs(metrics[key].item() - stub._metrics["train"][key][0]) < 1e-6, key
