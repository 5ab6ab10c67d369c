"""Rollouts for the RL trainers (GRPO, rejection sampling, PPO): sample G completions per prompt from the live
policy, score them, and lay them out as episodes for the optimizer."""

from __future__ import annotations

from alignkit.rollout.rollout import (
    EpisodeBatch,
    Rollout,
    attach_logprobs,
    completion_logprobs,
    completion_values,
    episode_batches,
    generate_rollout,
    rollout_logprobs,
    sampling_model,
    score_rollout,
)

__all__ = ["EpisodeBatch", "Rollout", "attach_logprobs", "completion_logprobs", "completion_values", "episode_batches",
           "generate_rollout", "rollout_logprobs", "sampling_model", "score_rollout"]
