"""Pure loss functions: tensors in, `(loss, metrics)` out, metrics detached scalar means with TRL's names."""

from __future__ import annotations

from alignkit.losses.lm import causal_lm_loss
from alignkit.losses.logprobs import (
    IGNORE_INDEX,
    entropy_from_logits,
    segment_ids_from_mask,
    sequence_lengths,
    sequence_logprobs,
    token_logprobs,
)
from alignkit.losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceLogps,
    PreferenceLossFn,
    build_preference_loss,
    combine,
    hinge,
    ipo,
    logits_metrics,
    nll_chosen,
    odds_ratio,
    orpo,
    requires_reference,
    robust,
    sigmoid,
    simpo,
)
from alignkit.losses.reward import bradley_terry_loss

__all__ = [
    "IGNORE_INDEX",
    "PREFERENCE_LOSSES",
    "PreferenceLogps",
    "PreferenceLossFn",
    "bradley_terry_loss",
    "build_preference_loss",
    "causal_lm_loss",
    "combine",
    "entropy_from_logits",
    "hinge",
    "ipo",
    "logits_metrics",
    "nll_chosen",
    "odds_ratio",
    "orpo",
    "requires_reference",
    "robust",
    "segment_ids_from_mask",
    "sequence_lengths",
    "sequence_logprobs",
    "sigmoid",
    "simpo",
    "token_logprobs",
]
