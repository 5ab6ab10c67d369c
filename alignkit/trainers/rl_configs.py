"""Configs of the RL stages. `rollout:` holds the knobs every RL trainer shares under TRL's GRPO names; `grpo:` the
GRPO family's objective. Each field's doc is the comment directly above it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from alignkit.errors import ConfigError, check_at_least
from alignkit.trainers.configs import ChatStageConfig, DataSection, OptimSection


@dataclass
class RolloutSection:
    # Completions sampled per prompt (G, the group).
    num_generations: int = 8
    # Prompts longer than this many tokens (after the chat template) are dropped, and counted in the log.
    max_prompt_length: int = 512
    # New tokens per completion at most; longer completions stop there ("truncated").
    max_completion_length: int = 256
    # Sampling temperature; the policy's log-probs are those of the logits divided by it (TRL's convention).
    temperature: float = 1.0
    # Nucleus sampling (1: off). With a filter on, the rollout's own log-probs are not the policy's, so the old
    # policy's log-probs are recomputed with a training forward.
    top_p: float = 1.0
    # Keep the k most likely tokens (0: off); as top_p.
    top_k: int = 0
    # A system message put before every question (null: none; "r1" for DeepSeek-R1-Zero's think/answer prompt).
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        check_at_least("rollout", self, 1, ("num_generations", "max_prompt_length", "max_completion_length"))
        if not self.temperature > 0:
            raise ConfigError(f"rollout.temperature must be > 0 for sampling; got {self.temperature}.")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"rollout.top_p must be in (0, 1] and top_k >= 0; got {self.top_p}, {self.top_k}.")


@dataclass
class GRPOSection:
    # Reward functions: built-ins (accuracy, format, arithmetic), rm:PATH (a trained reward model), module:function
    # or path/to/file.py:function.
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy"])
    # One weight per reward function (default 1.0 each).
    reward_weights: list[float] | None = None
    # Advantage estimator: grpo (group baseline), rloo (leave-one-out), reinforce_pp (batch baseline, KL in the reward).
    advantage_estimator: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"
    # Divide advantages by the std of the group, of the batch, or not at all (Dr. GRPO).
    scale_rewards: Literal["group", "batch", "none"] = "group"
    # Aggregation: grpo (sequence mean of token means), bnpo (token mean per micro-batch), dr_grpo (token sum over
    # batch x max_completion_length), dapo (token mean over the whole batch).
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    # Clip range of the importance ratio: [1 - epsilon, 1 + epsilon_high].
    epsilon: float = 0.2
    # Upper clip (DAPO's clip-higher); null: epsilon.
    epsilon_high: float | None = None
    # Optimizer steps over each rollout (mu); above 1 the ratio moves away from 1 and the clip acts.
    num_iterations: int = 1
    # KL coefficient to the frozen reference (0: no reference is built or run).
    beta: float = 0.0
    # KL estimator in the loss (and in the reward for reinforce_pp).
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # Leave completions cut at max_completion_length out of the loss (DAPO's overlong filtering).
    mask_truncated_completions: bool = False
    # DAPO's dynamic sampling: train only on groups whose rewards differ (an all-equal group has zero advantage),
    # drawing more prompts until the iteration's groups are full or max_sampling_rounds draws are spent.
    dynamic_sampling: bool = False
    # Most prompt batches drawn per iteration under dynamic_sampling (DAPO's max_num_gen_batches).
    max_sampling_rounds: int = 3
    # DAPO's soft overlong punishment over the last this many tokens of max_completion_length (null: off).
    overlong_cache: int | None = None
    # Old policy's log-probs: rollout (the sampling log-probs generate returned), recompute (a training forward
    # before the first update), auto (rollout when fp32 and no top-k / top-p filter, else recompute).
    old_logprobs: Literal["auto", "rollout", "recompute"] = "auto"

    def __post_init__(self) -> None:
        if not self.reward_funcs:
            raise ConfigError("grpo.reward_funcs is empty; name at least one reward function, e.g. accuracy.")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"grpo.reward_weights has {len(self.reward_weights)} values for "
                              f"{len(self.reward_funcs)} reward functions; give one weight each.")
        if not (math.isfinite(self.epsilon) and 0 < self.epsilon < 1):
            raise ConfigError(f"grpo.epsilon must be in (0, 1); got {self.epsilon}.")
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            raise ConfigError(f"grpo.epsilon_high must be > 0; got {self.epsilon_high}.")
        if self.num_iterations < 1:
            raise ConfigError(f"grpo.num_iterations must be at least 1; got {self.num_iterations}.")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"grpo.beta must be >= 0; got {self.beta}.")
        if self.max_sampling_rounds < 1:
            raise ConfigError(f"grpo.max_sampling_rounds must be at least 1; got {self.max_sampling_rounds}.")
        if self.overlong_cache is not None and self.overlong_cache < 1:
            raise ConfigError(f"grpo.overlong_cache must be at least 1 (or null); got {self.overlong_cache}.")


def _prompt_data() -> DataSection:
    # Prompt records with a checkable answer: {question, answer} (GSM8K's "#### n" answers are read); every other
    # field reaches the reward functions.
    return DataSection(format="auto", eval_size=0, eval_fraction=0.0)


@dataclass
class GRPOConfig(ChatStageConfig):
    """GRPO and its family: RL with verifiable rewards, G sampled completions per prompt and group baselines.

    Batch sizes count completions: train.batch_size / rollout.num_generations prompts per iteration, each
    iteration one rollout and grpo.num_iterations optimizer steps over it.
    """

    data: DataSection = field(default_factory=_prompt_data)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-6, schedule="constant"))
    # Sampling: completions per prompt, lengths, temperature and filters.
    rollout: RolloutSection = field(default_factory=RolloutSection)
    # The objective.
    grpo: GRPOSection = field(default_factory=GRPOSection)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train.batch_size % self.rollout.num_generations:
            raise ConfigError(
                f"train.batch_size {self.train.batch_size} counts completions and must be a multiple of "
                f"rollout.num_generations {self.rollout.num_generations} (whole groups per iteration)."
            )
        if self.grpo.advantage_estimator in ("grpo", "rloo") and self.rollout.num_generations < 2:
            raise ConfigError(
                f"grpo.advantage_estimator {self.grpo.advantage_estimator} compares completions of one prompt; "
                f"rollout.num_generations must be at least 2 (got {self.rollout.num_generations})."
            )
        if self.grpo.overlong_cache is not None and self.grpo.overlong_cache > self.rollout.max_completion_length:
            raise ConfigError("grpo.overlong_cache must not exceed rollout.max_completion_length.")


@dataclass
class RSSection:
    # Rounds of sample -> filter -> SFT; each round samples from (and fine-tunes) the previous round's model.
    rounds: int = 1
    # Prompts sampled per round: null takes every prompt each round; a number takes the next that many of the
    # shuffled prompts (wrapping around), so successive rounds see new prompts.
    prompts_per_round: int | None = None
    # Reward functions, as grpo.reward_funcs: built-ins, rm:PATH, module:function or path/to/file.py:function.
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy"])
    # One weight per reward function (default 1.0 each).
    reward_weights: list[float] | None = None
    # Which samples of a prompt are kept: best (the top one), top-k (the k best distinct), threshold (every
    # distinct sample with reward >= threshold).
    keep: Literal["best", "top-k", "threshold"] = "best"
    # Samples kept per prompt under top-k.
    k: int = 1
    # Lowest reward a kept sample may have (with a 0/1 checker, 1 keeps correct answers only); null: no floor.
    threshold: float | None = None
    # Train each round on every round's kept samples so far (true) or on this round's only (false).
    accumulate: bool = False
    # Prompts per generation batch while sampling.
    sample_batch_size: int = 64

    def __post_init__(self) -> None:
        check_at_least("rs", self, 1, ("rounds", "k", "sample_batch_size"))
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise ConfigError(f"rs.prompts_per_round must be at least 1 (or null); got {self.prompts_per_round}.")
        if not self.reward_funcs:
            raise ConfigError("rs.reward_funcs is empty; name at least one reward function, e.g. accuracy.")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"rs.reward_weights has {len(self.reward_weights)} values for "
                              f"{len(self.reward_funcs)} reward functions; give one weight each.")
        if self.keep == "threshold" and self.threshold is None:
            raise ConfigError("rs.keep is threshold but rs.threshold is null; set the lowest reward to keep.")


@dataclass
class RSConfig(ChatStageConfig):
    """Rejection sampling (Llama 3's post-training step): sample rollout.num_generations answers per prompt, keep
    the best by the reward functions, fine-tune on the kept ones; repeat for rs.rounds.

    `data.train` holds the prompts ({question, answer, ...}); data.max_length / packing apply to the SFT on the
    kept answers, and optim / train are each round's SFT settings (train.max_steps or train.epochs per round).
    """

    data: DataSection = field(default_factory=_prompt_data)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-5))
    # Sampling: answers per prompt (rollout.num_generations), lengths, temperature and filters.
    rollout: RolloutSection = field(default_factory=RolloutSection)
    # Rounds, the reward and what is kept.
    rs: RSSection = field(default_factory=RSSection)
