"""Preference metrics: how often a reward model, or a policy against its reference, ranks chosen above rejected."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from alignkit.data import preference_collate
from alignkit.losses.logprobs import IGNORE_INDEX, segment_ids_from_mask, sequence_logprobs, token_logprobs

if TYPE_CHECKING:
    from alignkit.data import PreferenceBatch, PreferenceExample
    from alignkit.model import LlamaForCausalLM


def reward_accuracy(scores_chosen: torch.Tensor, scores_rejected: torch.Tensor) -> float:
    """Fraction of pairs whose chosen score is strictly higher (a tie counts as wrong, as in TRL's RewardTrainer)."""
    if scores_chosen.shape != scores_rejected.shape:
        raise ValueError(
            f"scores_chosen {tuple(scores_chosen.shape)} and scores_rejected {tuple(scores_rejected.shape)} "
            "must have the same shape (one score per pair)."
        )
    if scores_chosen.numel() == 0:
        return 0.0
    return float((scores_chosen > scores_rejected).float().mean())


@torch.no_grad()
def _response_logps(model: LlamaForCausalLM, batch: PreferenceBatch) -> torch.Tensor:
    """Summed log-prob of each row's response tokens: [2B] (chosen rows, then rejected rows)."""
    targets = batch.labels != IGNORE_INDEX
    logits = model(
        batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask, logits_mask=targets
    )
    token_logps = token_logprobs(logits, batch.labels[targets])
    return sequence_logprobs(token_logps, segment_ids_from_mask(targets), batch.input_ids.shape[0])


def preference_accuracy(
    model: LlamaForCausalLM,
    ref: LlamaForCausalLM | None,
    pairs: Sequence[PreferenceExample],
    *,
    pad_id: int = 0,
    batch_size: int = 16,
) -> dict[str, float]:
    """DPO's implicit-reward accuracy: the fraction of pairs with a positive log-ratio margin.

    margin = [log pi(chosen) - log ref(chosen)] - [log pi(rejected) - log ref(rejected)], summed over response
    tokens (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290: the implicit reward is beta * log pi/ref, and
    beta > 0 does not change the sign). With `ref=None` the reference terms are dropped, which ranks by the
    policy's own log-probs. Returns {"accuracy", "margin_mean", "logps_chosen", "logps_rejected", "num"}
    (log-probs are the policy's, averaged over pairs).
    """
    was_training = [m.training for m in (model, ref) if m is not None]
    model.eval()
    if ref is not None:
        ref.eval()
    margins, chosen_sum, rejected_sum = [], 0.0, 0.0
    try:
        for start in range(0, len(pairs), batch_size):
            batch = preference_collate(list(pairs[start : start + batch_size]), pad_id=pad_id).to(model.device)
            half = batch.num_pairs
            policy = _response_logps(model, batch).double()
            ratio = policy - _response_logps(ref, batch).double() if ref is not None else policy
            margins.append(ratio[:half] - ratio[half:])
            chosen_sum += float(policy[:half].sum())
            rejected_sum += float(policy[half:].sum())
    finally:
        for m, mode in zip([m for m in (model, ref) if m is not None], was_training):
            m.train(mode)
    num = len(pairs)
    if not num:
        return {"accuracy": 0.0, "margin_mean": 0.0, "logps_chosen": 0.0, "logps_rejected": 0.0, "num": 0}
    all_margins = torch.cat(margins)
    return {
        "accuracy": float((all_margins > 0).double().mean()),
        "margin_mean": float(all_margins.mean()),
        "logps_chosen": chosen_sum / num,
        "logps_rejected": rejected_sum / num,
        "num": num,
    }
