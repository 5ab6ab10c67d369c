"""Evaluation: held-out loss and perplexity, verifiable-answer accuracy, reward and preference accuracy, and few-shot
log-likelihood tasks (`alignkit eval`)."""

from __future__ import annotations

from alignkit.eval.harness import TaskResult, evaluate_task, evaluate_tasks, write_outputs
from alignkit.eval.loglikelihood import Score, encode_pairs, score_requests
from alignkit.eval.perplexity import evaluate_loss
from alignkit.eval.preference import preference_accuracy, reward_accuracy
from alignkit.eval.task import evaluate_language_model, evaluate_reward_model
from alignkit.eval.tasks import Task, load_task, load_tasks
from alignkit.eval.verifiable import verifiable_accuracy

__all__ = [
    "Score", "Task", "TaskResult", "encode_pairs", "evaluate_language_model", "evaluate_loss",
    "evaluate_reward_model", "evaluate_task", "evaluate_tasks", "load_task", "load_tasks", "preference_accuracy",
    "reward_accuracy", "score_requests", "verifiable_accuracy", "write_outputs",
]
