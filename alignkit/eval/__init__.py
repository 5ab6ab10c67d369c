"""Evaluation: held-out loss and perplexity, verifiable-answer accuracy, reward and preference accuracy."""

from __future__ import annotations

from alignkit.eval.perplexity import evaluate_loss
from alignkit.eval.preference import preference_accuracy, reward_accuracy
from alignkit.eval.verifiable import verifiable_accuracy

__all__ = ["evaluate_loss", "preference_accuracy", "reward_accuracy", "verifiable_accuracy"]
