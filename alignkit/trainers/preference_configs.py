"""Configs of the preference stages: reward modelling (`alignkit train rm`) and the DPO family (`alignkit train dpo`).

They reuse the sections every stage shares (model, data, optim, train, lora) and add one section of their own:
`rm:` (Bradley-Terry options) and `dpo:` (the loss, its hyperparameters, diagnostics) plus `reference:` (where the
DPO reference log-probs come from). Each field's doc is the comment directly above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from alignkit.errors import ConfigError
from alignkit.trainers.configs import ChatStageConfig, DataSection, OptimSection


def _preference_data() -> DataSection:
    # Preference pairs: cut the prompt's start when a pair is too long (the responses are what is compared).
    # Packing: each pair's prompt is computed once and no padding is computed (exact: see
    # alignkit.data.shared_prompt_collate); packing=false gives the plain padded [2B, T] batch. null: packed on a
    # CPU (about 2x fewer tokens on HH-RLHF), padded on a GPU (the fused causal kernel needs no mask; measured
    # 1.1-3.1x faster for SmolLM2-135M on an H200, docs/benchmarks.md).
    return DataSection(format="preference", truncation="left", max_length=512, packing=None)


def _check_data(data: DataSection) -> None:
    if data.format not in ("auto", "preference"):
        raise ConfigError(
            f"data.format is {data.format!r}, but preference stages train on pairs ({{prompt, chosen, rejected}} or "
            "HH-RLHF {chosen, rejected} transcripts); set data.format to 'preference'."
        )
    if data.truncation == "split":
        raise ConfigError("data.truncation 'split' only applies to raw text; use left, right, drop or error for pairs.")


@dataclass
class RMSection:
    # Weight of the reward-centering term mean((r_chosen + r_rejected)^2) (TRL's center_rewards_coefficient; 0.01 is common).
    center_rewards_coefficient: float = 0.0
    # Record field holding a per-pair margin (Llama 2); used when present in the data, 0 where a record lacks it.
    margin_field: str = "margin"
    # Cut prompts longer than this many tokens from the left first (null: only data.max_length applies).
    max_prompt_length: int | None = None
    # Initial score head of a model that has none: zero (first loss exactly ln 2) or normal (TRL's N(0, 1/sqrt(H+1))).
    head_init: str = "zero"
    # Train only the last N decoder layers plus the final norm and the score head (null: every layer, or LoRA).
    train_last_layers: int | None = None
    # Records that are not usable pairs (no shared prompt, no final assistant turn): raise instead of dropping them.
    strict: bool = False

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient < 0:
            raise ConfigError(f"rm.center_rewards_coefficient must be >= 0; got {self.center_rewards_coefficient}.")
        if self.head_init not in ("zero", "normal"):
            raise ConfigError(f"rm.head_init must be 'zero' or 'normal'; got {self.head_init!r}.")
        if self.train_last_layers is not None and self.train_last_layers < 0:
            raise ConfigError(f"rm.train_last_layers must be >= 0; got {self.train_last_layers}.")


@dataclass
class RMConfig(ChatStageConfig):
    """Reward model: a scalar head on the last token, trained with the Bradley-Terry loss on preference pairs.

    The model's LM head is replaced by a score head; with LoRA the score head trains fully and ships with the
    adapter. Batch sizes count pairs.
    """

    data: DataSection = field(default_factory=_preference_data)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-5))
    # Bradley-Terry options.
    rm: RMSection = field(default_factory=RMSection)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_data(self.data)
        if self.lora.enabled and self.rm.train_last_layers is not None:
            raise ConfigError("Set either lora.enabled or rm.train_last_layers, not both.")


@dataclass
class DPOSection:
    # Preference loss(es) from alignkit.losses: sigmoid (DPO), robust, hinge, ipo, simpo, orpo, odds_ratio, nll_chosen / sft; a list adds them up.
    loss: list[str] = field(default_factory=lambda: ["sigmoid"])
    # One weight per entry of `loss` (default: 1.0 each).
    loss_weights: list[float] | None = None
    # beta of every loss that takes one (null: each loss's default: 0.1, or 2.0 for simpo).
    beta: float | None = None
    # Label-noise rate for sigmoid (cDPO) and robust (null: their defaults, 0 and 0.1).
    label_smoothing: float | None = None
    # SimPO's target margin gamma (null: 0.5).
    simpo_gamma: float | None = None
    # Add the chosen responses' per-token NLL with this weight (RPO; TRL's rpo_alpha / loss_type "sft"); null: off.
    rpo_alpha: float | None = None
    # Cut prompts longer than this many tokens from the left first (null: only data.max_length applies).
    max_prompt_length: int | None = None
    # Warn when both logps/chosen_delta and logps/rejected_delta (policy minus reference) are negative for this many optimizer steps in a row.
    displacement_window: int = 10
    # Records that are not usable pairs (no shared prompt, no final assistant turn): raise instead of dropping them.
    strict: bool = False

    def __post_init__(self) -> None:
        if not self.loss:
            raise ConfigError("dpo.loss is empty; name at least one preference loss, e.g. sigmoid.")
        if self.displacement_window < 1:
            raise ConfigError(f"dpo.displacement_window must be at least 1; got {self.displacement_window}.")
        robust = "robust" in self.loss
        checks = [
            (self.beta is None or (math.isfinite(self.beta) and self.beta > 0), "beta", "a number > 0"),
            (self.label_smoothing is None or 0 <= self.label_smoothing < (0.5 if robust else 0.5 + 1e-12),
             "label_smoothing", "in [0, 0.5) for robust, [0, 0.5] for sigmoid"),
            (self.simpo_gamma is None or math.isfinite(self.simpo_gamma), "simpo_gamma", "a finite number"),
            (self.rpo_alpha is None or (math.isfinite(self.rpo_alpha) and self.rpo_alpha >= 0), "rpo_alpha",
             "a number >= 0"),
            (self.loss_weights is None or all(math.isfinite(w) for w in self.loss_weights), "loss_weights",
             "finite numbers"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ConfigError(f"dpo.{name} must be {rule}; got {getattr(self, name)!r}.")
        # Unknown loss names, a weight list of the wrong length, a hyperparameter no chosen loss takes: now, not at
        # step 1 after the model load and the reference pass.
        from alignkit.losses import build_preference_loss

        names, weights = self.terms()
        build_preference_loss(names, weights, **self.hyperparameters())

    def hyperparameters(self) -> dict[str, float]:
        """The hyperparameters the recipe set (unset ones keep each loss's own default)."""
        values = {"beta": self.beta, "label_smoothing": self.label_smoothing, "simpo_gamma": self.simpo_gamma}
        return {key: value for key, value in values.items() if value is not None}

    def terms(self) -> tuple[list[str], list[float]]:
        """(loss names, weights), with the RPO term appended when rpo_alpha is set."""
        weights = list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(self.loss)
        names = list(self.loss)
        if self.rpo_alpha is not None:
            names.append("nll_chosen")
            weights.append(self.rpo_alpha)
        return names, weights


@dataclass
class ReferenceSection:
    # Reference model: null = the starting policy (with LoRA: the same weights with the adapter disabled); or a path.
    path: str | None = None
    # Compute the reference log-probs once before training and cache them in the run directory (false: every step).
    precompute: bool = True


@dataclass
class DPOConfig(ChatStageConfig):
    """DPO family: preference optimisation from pairs (DPO, cDPO, robust, hinge, IPO, SimPO, ORPO, + NLL).

    With LoRA the reference is the base with the adapter disabled: no second copy of the weights. Batch sizes
    count pairs.
    """

    data: DataSection = field(default_factory=_preference_data)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=5e-7))
    # The loss and its hyperparameters.
    dpo: DPOSection = field(default_factory=DPOSection)
    # Where the reference log-probs come from (ignored, and must be unset, for reference-free losses).
    reference: ReferenceSection = field(default_factory=ReferenceSection)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_data(self.data)
