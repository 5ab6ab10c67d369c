"""Parity with TRL's own loss code, run as unbound functions on stub trainers (no model, no Trainer setup).

TRL 1.x computes the DPO losses inside `DPOTrainer._compute_loss`; the stub model below returns the per-token
log-probs, mean logits and entropy that TRL's fused LM head would, so only TRL's loss and metric code runs.
CPO (SimPO) and ORPO still have small loss methods in `trl.experimental`.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from alignkit.losses import (
    PreferenceLogps,
    build_preference_loss,
    logits_metrics,
    nll_chosen,
    odds_ratio,
    orpo,
    simpo,
)

dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")

BATCH, SEQ, VOCAB = 4, 12, 9


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def make_batch(equal_chosen_lengths: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """[2B, T+1] rows, chosen then rejected: position 0 is prompt, then a completion of random length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, SEQ + 1, (2 * BATCH,), generator=g)
    if equal_chosen_lengths:
        lengths[:BATCH] = 7
    positions = torch.arange(SEQ + 1)
    completion_mask = ((positions >= 1) & (positions <= lengths[:, None])).long()
    shift_mask = completion_mask[:, 1:].bool()
    token_logps = -torch.rand(2 * BATCH, SEQ, generator=g, dtype=torch.float64) * 3 * shift_mask
    logits = torch.randn(2 * BATCH, SEQ, VOCAB, generator=g, dtype=torch.float64)
    ref_logps = token_logps.sum(1) + torch.randn(2 * BATCH, generator=g, dtype=torch.float64)
    return dict(completion_mask=completion_mask, token_logps=token_logps, logits=logits, ref_logps=ref_logps)


def run_trl(batch: dict[str, torch.Tensor], loss_type: list[str], weights: list[float], beta: float,
            label_smoothing: float = 0.0) -> tuple[float, dict[str, float]]:
    outputs = SimpleNamespace(
        log_probs=batch["token_logps"], entropy=torch.zeros(2 * BATCH, SEQ),
        mean_logits=batch["logits"].mean(-1), is_top1=torch.zeros(2 * BATCH, SEQ, dtype=torch.bool),
    )

    def model(**_: Any) -> SimpleNamespace:
        return outputs

    model.training = True  # type: ignore[attr-defined]
    stub = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device="cpu", gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=loss_type, loss_weights=weights, beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, args=SimpleNamespace(), _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )
    completion_mask = batch["completion_mask"]
    inputs = {
        "input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": batch["ref_logps"][:BATCH], "ref_rejected_logps": batch["ref_logps"][BATCH:],
    }
    loss = dpo_trainer.DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return float(loss), {key: values[-1] for key, values in stub._metrics["train"].items()}


def ours(batch: dict[str, torch.Tensor]) -> PreferenceLogps:
    sums = batch["token_logps"].sum(1)
    lengths = batch["completion_mask"].sum(1)
    return PreferenceLogps(
        policy_chosen=sums[:BATCH], policy_rejected=sums[BATCH:],
        reference_chosen=batch["ref_logps"][:BATCH], reference_rejected=batch["ref_logps"][BATCH:],
        chosen_lengths=lengths[:BATCH], rejected_lengths=lengths[BATCH:],
    )


CASES = [
    (["sigmoid"], [1.0], 0.1, 0.0),
    (["sigmoid"], [1.0], 1.0, 0.0),
    (["hinge"], [1.0], 0.5, 0.0),
    (["ipo"], [1.0], 0.1, 0.0),
    (["ipo"], [1.0], 0.7, 0.0),
    (["robust"], [1.0], 0.1, 0.1),
    (["robust"], [1.0], 0.3, 0.25),
    (["sigmoid", "sft"], [1.0, 0.5], 0.1, 0.0),
    (["ipo", "hinge", "sft"], [0.8, 0.2, 1.0], 0.2, 0.0),
]


@pytest.mark.parametrize(("loss_type", "weights", "beta", "label_smoothing"), CASES)
def test_dpo_losses_and_metrics_match_trl(
    loss_type: list[str], weights: list[float], beta: float, label_smoothing: float
) -> None:
    # TRL's "sft" averages over all chosen tokens of the batch, ours per pair: equal chosen lengths make them agree.
    batch = make_batch(equal_chosen_lengths="sft" in loss_type)
    theirs, their_metrics = run_trl(batch, loss_type, weights, beta, label_smoothing)
    hyper: dict[str, float] = {"beta": beta}
    if "robust" in loss_type:
        hyper["label_smoothing"] = label_smoothing
    losses, metrics = build_preference_loss(loss_type, weights, **hyper)(ours(batch))
    assert abs(losses.mean().item() - theirs) < 1e-6
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert abs(metrics[key].item() - their_metrics[key]) < 1e-6, key
    shift_mask = batch["completion_mask"][:, 1:].bool()
    logit_metrics = logits_metrics(batch["logits"][:BATCH][shift_mask[:BATCH]],
                                   batch["logits"][BATCH:][shift_mask[BATCH:]])
    for key in ("logits/chosen", "logits/rejected"):
        assert abs(logit_metrics[key].item() - their_metrics[key]) < 1e-6, key


def test_nll_chosen_differs_from_trl_sft_only_by_token_weighting() -> None:
    batch = make_batch(equal_chosen_lengths=False)
    theirs, _ = run_trl(batch, ["sft"], [1.0], 0.1)
    pairs = ours(batch)
    token_weighted = -pairs.policy_chosen.sum() / pairs.chosen_lengths.sum()
    assert abs(token_weighted.item() - theirs) < 1e-6
    assert abs(nll_chosen(pairs)[0].mean().item() - theirs) > 1e-3  # per-pair mean: a documented difference


def reference_free_pairs() -> tuple[PreferenceLogps, torch.Tensor, torch.Tensor]:
    pairs = ours(make_batch(equal_chosen_lengths=False, seed=3))
    chosen_mean = pairs.policy_chosen / pairs.chosen_lengths
    rejected_mean = pairs.policy_rejected / pairs.rejected_lengths
    return pairs, chosen_mean, rejected_mean


def test_simpo_matches_trl_cpo_loss() -> None:
    cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    pairs, chosen_mean, rejected_mean = reference_free_pairs()
    stub = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=0.0,
                           accelerator=SimpleNamespace(device="cpu"))
    # TRL's CPO computes length-averaged log-probs for simpo before calling cpo_loss.
    their_losses, their_chosen, their_rejected = cpo_trainer.CPOTrainer.cpo_loss(stub, chosen_mean, rejected_mean)
    losses, metrics = simpo(pairs, beta=2.0, simpo_gamma=0.7)
    torch.testing.assert_close(losses, their_losses, atol=1e-6, rtol=0)
    assert abs(metrics["rewards/chosen"].item() - their_chosen.mean().item()) < 1e-6
    assert abs(metrics["rewards/rejected"].item() - their_rejected.mean().item()) < 1e-6


def test_odds_ratio_matches_trl_orpo() -> None:
    orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    pairs, chosen_mean, rejected_mean = reference_free_pairs()
    stub = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    their_ratio_losses, their_chosen, their_rejected, their_log_odds_ratio, their_log_odds_chosen = (
        orpo_trainer.ORPOTrainer.odds_ratio_loss(stub, chosen_mean, rejected_mean)
    )
    losses, metrics = odds_ratio(pairs, beta=0.25)
    # TRL returns beta * logsigmoid(log_odds) and subtracts it from its NLL; ours is the loss, -beta * logsigmoid.
    torch.testing.assert_close(losses, -their_ratio_losses.double(), atol=1e-6, rtol=0)  # TRL computes in fp32
    assert abs(metrics["log_odds_ratio"].item() - their_log_odds_ratio.item()) < 1e-6
    assert abs(metrics["log_odds_chosen"].item() - their_log_odds_chosen.item()) < 1e-6
    assert abs(metrics["rewards/chosen"].item() - their_chosen.mean().item()) < 1e-6
    assert abs(metrics["rewards/rejected"].item() - their_rejected.mean().item()) < 1e-6
    full, _ = functools.partial(orpo, beta=0.25)(pairs)
    torch.testing.assert_close(full, losses + nll_chosen(pairs)[0], atol=0, rtol=0)
