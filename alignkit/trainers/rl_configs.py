"""Configs of the RL stages. `rollout:` holds the knobs every RL trainer shares under TRL's GRPO names; `grpo:` the
GRPO family's objective. Each field's doc is the comment directly above it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.errors import ConfigError, check_at_least
from alignkit.generation.sampling import SamplingParams
from alignkit.rewards.verifiable import check_reward_specs
from alignkit.trainers.configs import ChatStageConfig, DataSection, EvalSection, OptimSection


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
    # Where a completion ends (TRL's stop_token): null, the tokenizer's stop tokens (end of turn and EOS); "eos",
    # the EOS token only; or any text that is one token ("\n", say): the completion ends at its first occurrence,
    # the token kept. A completion that never reaches it is cut at max_completion_length ("truncated", what
    # ppo.missing_eos_penalty penalises).
    stop_token: str | None = None
    # At least this many tokens before a completion's stop token: the stop tokens are masked out of the sampling
    # distribution until then (against degenerate empty answers). Like top_p, it makes the rollout's own log-probs differ from
    # the policy's, so the old policy's log-probs are recomputed.
    min_completion_length: int = 0
    # GRPO: training forwards put the completions of one prompt in one row after a single copy of the prompt (a mask
    # keeps them apart), so the prompt's tokens run once per group instead of num_generations times. The same
    # log-probs up to rounding. Attention then spans the whole row: with long completions and many generations
    # the attention cost can outgrow what sharing saves; set false there.
    share_prompt: bool = True

    def __post_init__(self) -> None:
        check_at_least("rollout", self, 1, ("num_generations", "max_prompt_length", "max_completion_length"))
        if not self.temperature > 0:
            raise ConfigError(f"rollout.temperature must be > 0 for sampling; got {self.temperature}.")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"rollout.top_p must be in (0, 1] and top_k >= 0; got {self.top_p}, {self.top_k}.")
        if not 0 <= self.min_completion_length <= self.max_completion_length:
            raise ConfigError(f"rollout.min_completion_length must be in [0, max_completion_length "
                              f"{self.max_completion_length}]; got {self.min_completion_length}.")
        if self.stop_token == "":
            raise ConfigError("rollout.stop_token is empty; give a one-token text, \"eos\", or null.")

    @property
    def policy_logprobs(self) -> bool:
        """Whether the rollout's sampling log-probs are the policy's own (no filter, no masked stop tokens)."""
        return self.top_p == 1.0 and self.top_k == 0 and self.min_completion_length == 0

    def old_logprobs_from_rollout(self, old_logprobs: str, precision: str) -> bool:
        """Whether a trainer's old_logprobs setting (rollout / recompute / auto) takes the old policy's log-probs
        from the sampler: always for rollout; for auto, in fp32 when they are the policy's own."""
        return old_logprobs == "rollout" or (old_logprobs == "auto" and precision == "fp32" and self.policy_logprobs)

    def sampling_params(self, tokenizer: Any, **extra: Any) -> SamplingParams:
        """The generation settings of this section, with the stop token resolved on `tokenizer`."""
        stop_ids = None
        if self.stop_token == "eos":
            if tokenizer.eos_token_id is None:
                raise ConfigError("rollout.stop_token is \"eos\", but the tokenizer has no EOS token; name a token.")
            stop_ids = [tokenizer.eos_token_id]
        elif self.stop_token is not None:
            ids = tokenizer.encode(self.stop_token)
            if len(ids) != 1:
                raise ConfigError(f"rollout.stop_token {self.stop_token!r} is {len(ids)} tokens for this tokenizer "
                                  f"({ids}); it must be exactly one token (or \"eos\", or null).")
            stop_ids = ids
        return SamplingParams(max_new_tokens=self.max_completion_length, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, stop_token_ids=stop_ids,
                              min_new_tokens=self.min_completion_length, **extra)


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
    # before the first update), auto (rollout when fp32 and rollout.policy_logprobs: no top-k / top-p filter
    # and no min_completion_length; else, with num_iterations 1, the step's own log-probs detached, exactly
    # on-policy and no extra forward; else recompute).
    old_logprobs: Literal["auto", "rollout", "recompute"] = "auto"

    def __post_init__(self) -> None:
        check_reward_specs("grpo", self.reward_funcs, self.reward_weights, "accuracy")
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
        check_reward_specs("rs", self.reward_funcs, self.reward_weights, "accuracy")
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


@dataclass
class PPOSection:
    # Reward functions, as grpo.reward_funcs: rm:PATH (a trained reward model: the RLHF reward), built-ins
    # (accuracy, format, arithmetic), module:function or path/to/file.py:function.
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy"])
    # One weight per reward function (default 1.0 each); the score of a completion is the weighted sum.
    reward_weights: list[float] | None = None
    # KL coefficient beta of the per-token reward -beta * KL_t (TRL's 0.05); the adaptive controller's start value.
    kl_coef: float = 0.05
    # KL estimator in the per-token reward: k1 (log pi - log ref, TRL's default), k2 or k3.
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    # Where the KL penalty goes: reward (-kl_coef * KL_t in every token's reward, through GAE: TRL, InstructGPT) or
    # loss (kl_coef * KL_t of the live policy added to the per-token loss with its gradient, the reward being the
    # score alone: GRPO's way, usually with kl_estimator k3).
    kl_penalty: Literal["reward", "loss"] = "reward"
    # Steer kl_coef toward target_kl (Ziegler et al.'s adaptive controller) instead of keeping it fixed.
    adaptive_kl: bool = False
    # The adaptive controller's target: the rollout's mean KL per completion (summed over its tokens), in nats.
    target_kl: float = 6.0
    # The adaptive controller's horizon in completions: each rollout moves kl_coef by at most a factor
    # 1 +- 0.2 * completions / horizon.
    horizon: float = 10000.0
    # Discount of GAE (1: none, TRL's default).
    gamma: float = 1.0
    # GAE's lambda: 1 is the Monte-Carlo return minus the value, 0 the one-step TD error.
    lam: float = 0.95
    # Clip range of the policy's importance ratio: [1 - cliprange, 1 + cliprange].
    cliprange: float = 0.2
    # Clip range of the critic's values around those it predicted at rollout time.
    cliprange_value: float = 0.2
    # Weight of the value loss next to the policy loss (TRL's 0.1). The critic has its own optimizer, so with
    # AdamW this mostly sets the value loss's share of critic-side gradient clipping, not its step size.
    vf_coef: float = 0.1
    # Passes over each rollout (TRL's 4); each pass shuffles the completions into num_mini_batches minibatches.
    num_ppo_epochs: int = 4
    # Minibatches per pass, each one optimizer step: num_ppo_epochs x num_mini_batches steps per rollout.
    num_mini_batches: int = 1
    # Whiten the per-token rewards (scale only, over the whole batch) before GAE, as lm-human-preferences does.
    whiten_rewards: bool = False
    # Normalise scores by the running mean and std of every score seen so far (TRL's use_score_norm).
    reward_norm: bool = False
    # Clip the scores (after normalisation) to [-reward_clip, reward_clip]; null: no clipping.
    reward_clip: float | None = None
    # Subtracted from the score of a completion that did not stop (cut at max_completion_length); null: off.
    missing_eos_penalty: float | None = None
    # Entropy bonus: entropy_coef times the policy's token-mean entropy is subtracted from the loss (0: off).
    entropy_coef: float = 0.0
    # Dual clip c > 1: the loss of a token with negative advantage is capped at -c * A (null: off).
    dual_clip: float | None = None
    # Iterations at the start that train only the critic (the policy is not updated), so the first policy updates
    # get a useful baseline.
    critic_warmup_steps: int = 0
    # Where the critic starts: reward_model (the first rm:PATH reward model's weights and head, as TRL and
    # InstructGPT do), policy (the starting policy's decoder with a zero-initialised value head; under LoRA it
    # shares the policy's frozen base), auto (reward_model when an rm:PATH reward is given, else policy).
    critic_init: Literal["auto", "reward_model", "policy"] = "auto"
    # The critic's learning rate (null: optim.lr); its schedule and the rest of its optimizer are optim's.
    critic_lr: float | None = None
    # Weight of the pretraining-mix (PTX) loss: the token-mean next-token loss on one micro-batch of ptx.train per
    # PPO minibatch, added to the policy's loss (InstructGPT's PPO-ptx), against forgetting what pretraining or
    # SFT taught. Default 0, TRL's plain PPO: PTX needs a data source (ptx.train) a PPO run does not otherwise
    # have, and costs the forward and backward of one more micro-batch per optimizer step (docs/concepts/ppo.md).
    ptx_coef: float = 0.0
    # Old policy's log-probs: rollout (the sampling log-probs generate returned), recompute (a no-grad forward
    # after the rollout), auto (rollout when fp32 and rollout.policy_logprobs: no top-k / top-p filter
    # and no min_completion_length; else recompute).
    old_logprobs: Literal["auto", "rollout", "recompute"] = "auto"
    # Stop the run when the rollout's KL to the reference exceeds this many nats per completion token (the policy
    # has left the reference: a diverged run), naming the last good checkpoint; null: only a NaN KL stops it.
    kl_stop: float | None = 10.0

    def __post_init__(self) -> None:
        check_reward_specs("ppo", self.reward_funcs, self.reward_weights, "rm:runs/rm/final")
        check_at_least("ppo", self, 1, ("num_ppo_epochs", "num_mini_batches"))
        check_at_least("ppo", self, 0, ("critic_warmup_steps",))
        rules = [
            ("kl_coef", self.kl_coef, self.kl_coef >= 0, ">= 0"),
            ("gamma", self.gamma, 0 <= self.gamma <= 1, "in [0, 1]"),
            ("lam", self.lam, 0 <= self.lam <= 1, "in [0, 1]"),
            ("cliprange", self.cliprange, 0 < self.cliprange < 1, "in (0, 1)"),
            ("cliprange_value", self.cliprange_value, self.cliprange_value > 0, "> 0"),
            ("vf_coef", self.vf_coef, self.vf_coef >= 0, ">= 0"),
            ("entropy_coef", self.entropy_coef, self.entropy_coef >= 0, ">= 0"),
            ("ptx_coef", self.ptx_coef, self.ptx_coef >= 0, ">= 0"),
        ]
        optional = [
            ("reward_clip", self.reward_clip, "> 0", lambda v: v > 0),
            ("missing_eos_penalty", self.missing_eos_penalty, "a finite number", lambda v: True),
            ("dual_clip", self.dual_clip, "> 1", lambda v: v > 1),
            ("critic_lr", self.critic_lr, "> 0", lambda v: v > 0),
            ("kl_stop", self.kl_stop, "> 0", lambda v: v > 0),
        ]
        rules += [(name, v, ok(v), rule) for name, v, rule, ok in optional if v is not None]
        for name, value, ok, rule in rules:
            if not (math.isfinite(value) and ok):
                raise ConfigError(f"ppo.{name} must be {rule}; got {value}.")
        if self.adaptive_kl:
            for name, value in (("kl_coef", self.kl_coef), ("target_kl", self.target_kl), ("horizon", self.horizon)):
                if not (math.isfinite(value) and value > 0):
                    raise ConfigError(f"ppo.adaptive_kl scales ppo.kl_coef toward ppo.target_kl over ppo.horizon; "
                                      f"ppo.{name} must be > 0 (got {value}).")
        if self.critic_init == "reward_model" and not any(f.startswith("rm:") for f in self.reward_funcs):
            raise ConfigError("ppo.critic_init is reward_model, but no ppo.reward_funcs entry is a reward model "
                              "(rm:PATH); add one, or set ppo.critic_init to policy.")

    def reward_model_path(self) -> str | None:
        """The first rm:PATH reward's path: where critic_init reward_model starts the critic."""
        return next((f[3:] for f in self.reward_funcs if f.startswith("rm:")), None)


def _ptx_data() -> DataSection:
    # Pretraining or SFT records for the PTX loss (ppo.ptx_coef): text records or a .txt file (cut into
    # max_length chunks), or chat / instruction records (loss on the assistant tokens). Empty: no PTX data.
    # eval_size / eval_fraction hold records out for eval/ptx_loss, the forgetting monitor at each evaluation.
    return DataSection(format="auto", eval_fraction=0.0)


@dataclass
class PPOConfig(ChatStageConfig):
    """PPO (RLHF with a reward model, a critic and a KL penalty to the starting policy), optionally with the
    pretraining-mix loss (PPO-ptx).

    Batch sizes count completions: train.batch_size / rollout.num_generations prompts per iteration, each iteration
    one rollout and ppo.num_ppo_epochs x ppo.num_mini_batches optimizer steps of the policy and the critic over it.
    """

    data: DataSection = field(default_factory=_prompt_data)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=3e-6, schedule="constant"))
    # Sampling: completions per prompt (1 by default: PPO needs no group), lengths, temperature and filters.
    rollout: RolloutSection = field(default_factory=lambda: RolloutSection(num_generations=1))
    # The objective, the KL controller, the critic and the tricks.
    ppo: PPOSection = field(default_factory=PPOSection)
    # The PTX data (ptx.train), its format and length, and a held-out share for eval/ptx_loss.
    ptx: DataSection = field(default_factory=_ptx_data)
    # Capabilities checked at every evaluation next to eval/ptx_loss: the forgetting monitor.
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        super().__post_init__()
        n, minibatches = self.train.batch_size, self.ppo.num_mini_batches
        if n % self.rollout.num_generations:
            raise ConfigError(
                f"train.batch_size {n} counts completions and must be a multiple of rollout.num_generations "
                f"{self.rollout.num_generations} (whole groups per iteration)."
            )
        if n % minibatches:
            raise ConfigError(f"train.batch_size {n} does not split into ppo.num_mini_batches {minibatches} equal "
                              "minibatches; make it a multiple.")
        if self.ppo.ptx_coef > 0 and not self.ptx.train:
            raise ConfigError(f"ppo.ptx_coef is {self.ppo.ptx_coef} but ptx.train is empty; point ptx.train at "
                              "pretraining or SFT data, or set ppo.ptx_coef to 0.")
