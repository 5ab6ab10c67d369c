"""Rewards: reward-model scoring (a trained `alignkit train rm` model), and the helpers trainers share with it."""

from alignkit.rewards.scoring import (
    conversation_ids,
    last_token_rewards,
    load_reward_model,
    score_conversations,
    score_ids,
    score_model_from_causal_lm,
)

__all__ = [
    "conversation_ids",
    "last_token_rewards",
    "load_reward_model",
    "score_conversations",
    "score_ids",
    "score_model_from_causal_lm",
]
