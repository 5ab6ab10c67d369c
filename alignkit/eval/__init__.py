"""Evaluation: held-out loss and perplexity, verifiable-answer accuracy, reward and preference accuracy."""

from __future__ import annotations

from alignkit.eval.perplexity import evaluate_loss
from alignkit.eval.preference import preference_accuracy, reward_accuracy
from alignkit.eval.task import evaluate_language_model, evaluate_reward_model
from alignkit.eval.verifiable import verifiable_accuracy

__all__ = ["evaluate_language_model", "evaluate_loss", "evaluate_reward_model", "preference_accuracy", "reward_accuracy", "verifiable_accuracy"]
