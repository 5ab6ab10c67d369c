"""REINFORCE with a learned value baseline, on the engine's step API: a whole RL trainer in one readable file.

Toy task: the policy writes `completion_length` tokens after a random prompt and earns one point for every
`target_token` it writes. The critic (a scalar-head model) learns the expected reward of a prompt, and the policy
gradient uses reward - value as its advantage (Williams 1992; the baseline lowers the variance, not the bias).

    python examples/reinforce.py runs/reinforce        # about ten seconds on a laptop CPU
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from alignkit.engine import Engine, Models, OptimSection, Trainable, TrainSection, mean
from alignkit.generation import SamplingParams, generate
from alignkit.losses import token_logprobs
from alignkit.model import LlamaForCausalLM, LlamaForScore, ModelConfig


@dataclass
class ReinforceConfig:
    train: TrainSection = field(default_factory=lambda: TrainSection(batch_size=32, micro_batch_size=16,
                                                                     max_steps=30, report_to=[]))
    policy_optim: OptimSection = field(default_factory=lambda: OptimSection(lr=3e-3, schedule="constant"))
    value_optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-2, schedule="constant"))
    model: dict[str, Any] = field(default_factory=lambda: dict(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        max_position_embeddings=32))
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    prompt_length: int = 4
    completion_length: int = 8
    target_token: int = 3
    # Iterations at the start that train only the critic, so the first policy updates get a useful baseline.
    value_warmup: int = 2


class Prompts:
    """An endless source of random prompts; its generator's state goes into every checkpoint."""

    def __init__(self, cfg: ReinforceConfig) -> None:
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(cfg.train.seed)

    def next(self) -> list[list[int]]:
        shape = (self.cfg.prompts_per_step, self.cfg.prompt_length)
        # Token 0 is BOS; the rest of the vocabulary except the target token makes up the prompts.
        ids = torch.randint(4, self.cfg.model["vocab_size"], shape, generator=self.generator)
        return [[0, *row] for row in ids.tolist()]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class Episodes:
    """One micro-batch of episodes: prompt + completion ids [E, P + C], and each episode's reward [E]."""

    ids: torch.Tensor
    prompt_length: int
    rewards: torch.Tensor

    @property
    def num_episodes(self) -> int:
        return self.ids.shape[0]


def value_loss(models: Models, batch: Episodes, num_episodes: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Squared error of the critic's value at the last prompt token, summed / the step's episodes."""
    values = models["value"](batch.ids[:, : batch.prompt_length])[:, -1].float()  # [E]
    loss = (values - batch.rewards).pow(2).sum() / num_episodes
    return loss, {"value/mean": values.mean(), "value/error": (values - batch.rewards).abs().mean()}


def reinforce_loss(models: Models, batch: Episodes, num_episodes: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """-(reward - value) x log pi(completion), summed / the step's episodes, plus the critic's loss."""
    critic, metrics = value_loss(models, batch, num_episodes)
    with torch.no_grad():
        baseline = models["value"](batch.ids[:, : batch.prompt_length])[:, -1].float()
    advantages = batch.rewards - baseline  # [E], no gradient into the critic
    mask = torch.zeros_like(batch.ids, dtype=torch.bool)
    mask[:, batch.prompt_length - 1 : -1] = True  # the positions that predict the completion
    logits = models["policy"](batch.ids, logits_mask=mask)  # [E * C, V]
    logps = token_logprobs(logits, batch.ids[:, batch.prompt_length :].reshape(-1)).view(batch.num_episodes, -1)
    policy = -(advantages * logps.sum(-1)).sum() / num_episodes
    metrics["advantage/abs"] = mean(advantages.abs().mean(), weight=batch.num_episodes)
    return policy + critic, metrics


def build_models(cfg: ReinforceConfig) -> tuple[LlamaForCausalLM, LlamaForScore]:
    torch.manual_seed(cfg.train.seed)
    policy, value = LlamaForCausalLM(ModelConfig(**cfg.model)), LlamaForScore(ModelConfig(**cfg.model))
    policy.init_weights()
    value.init_weights()
    return policy, value


def train(cfg: ReinforceConfig, run_dir: str, *, stream: Any = None) -> list[dict[str, Any]]:
    policy, value = build_models(cfg)
    engine = Engine({"policy": Trainable(policy, cfg.policy_optim), "value": Trainable(value, cfg.value_optim)},
                    cfg.train, run_dir=run_dir, total_steps=cfg.train.max_steps or 1,
                    count_fn=lambda batch: batch.num_episodes, count_unit="episodes", stream=stream)
    prompts = Prompts(cfg)
    engine.start(prompts=prompts)  # with train.resume: models, optimizers, prompts and every RNG come back
    sampling = SamplingParams(max_new_tokens=cfg.completion_length, n=cfg.samples_per_prompt, stop_token_ids=[])
    micro = cfg.train.micro_batch_size

    for iteration in engine.iterations():
        # Rollout with the live policy (its seed is drawn from torch's RNG, which every checkpoint restores).
        batch_prompts = prompts.next()
        with engine.generation_model("policy") as live_policy:
            completions = generate(live_policy, batch_prompts, sampling)
        ids = torch.tensor([batch_prompts[c.prompt_index] + c.token_ids for c in completions])
        rewards = torch.tensor([float(c.token_ids.count(cfg.target_token)) for c in completions])
        episodes = [Episodes(ids[i : i + micro], cfg.prompt_length + 1, rewards[i : i + micro])
                    for i in range(0, len(completions), micro)]

        # One exact optimizer step over all episodes: the critic alone during warm-up, then both models.
        if iteration <= cfg.value_warmup:
            row = engine.step(episodes, value_loss, models=["value"])
        else:
            row = engine.step(episodes, reinforce_loss)
        row["reward"] = rewards.mean().item()
        engine.log(row)
        engine.save_if_due()
    return engine.finish()


if __name__ == "__main__":
    rows = train(ReinforceConfig(), sys.argv[1] if len(sys.argv) > 1 else "runs/reinforce")
    print(f"mean reward: first step {rows[0]['reward']:.2f}, last step {rows[-1]['reward']:.2f}")
