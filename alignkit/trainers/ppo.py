"""PPO: RLHF with a reward, a critic and a KL penalty to the starting policy, optionally with the PTX loss.

Four roles: the actor (the policy, trained), the critic (a scalar-head model, trained with its own learning rate),
the reference (the frozen starting policy; under LoRA the policy with its adapters disabled) and the reward (a
reward model `rm:PATH` and/or reward functions, combined with weights). Each iteration samples completions from the
live policy, scores them, turns score and per-token KL into per-token rewards, estimates advantages with GAE on the
critic's values, whitens them over the whole batch, and takes ppo.num_ppo_epochs x ppo.num_mini_batches optimizer
steps of both models (with one PTX micro-batch per step when ppo.ptx_coef > 0). The pure pieces are
`alignkit.losses.ppo` and `alignkit.losses.policy`; docs/concepts/ppo.md has the objective and one iteration
step by step. The loop below reads top to bottom on the engine's step API.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from alignkit.data import Batch
from alignkit.engine import (
    Engine,
    Frozen,
    Models,
    StepBatches,
    Trainable,
    autocast,
    maximum,
    mean,
    minimum,
    total,
)
from alignkit.engine import distributed as dist
from alignkit.engine.metrics import reduce_metrics
from alignkit.errors import ConfigError, DataError, UserError
from alignkit.losses.lm import causal_lm_loss
from alignkit.losses.policy import aggregate, clipped_surrogate, kl_estimate
from alignkit.losses.ppo import (
    WHITEN_EPS,
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clipped_value_loss,
    gae,
    per_token_rewards,
)
from alignkit.model import DTYPES, LlamaForCausalLM
from alignkit.model.llama import LlamaForScore
from alignkit.model.lora import disable_adapters
from alignkit.rewards.scoring import load_reward_model, score_model_from_causal_lm
from alignkit.rewards.verifiable import RewardFn, load_rewards
from alignkit.rollout import (
    EpisodeBatch,
    completion_logprobs,
    completion_values,
    episode_batches,
    generate_rollout,
    rollout_logprobs,
    sampling_model,
    score_rollout,
)
from alignkit.rollout.prompts import load_prompts, prompt_fields, reward_prompts
from alignkit.tokenizer import Tokenizer, set_chat_template
from alignkit.trainers.common import (
    RunResult,
    add_lora,
    build_model,
    load_tokenizer,
    read_records,
    setup,
    total_steps,
)
from alignkit.trainers.language import batching, lm_forward, load_examples
from alignkit.trainers.rl_configs import PPOConfig
from alignkit.trainers.stage import (
    check_prompt_batch,
    combine_evals,
    export,
    prepare_run_dir,
    sharded_eval,
    task_eval,
)

Config = PPOConfig


class KLDivergedError(UserError):
    """The rollout's KL to the reference became NaN or passed ppo.kl_stop; no update from it was applied."""


@dataclass
class PTXBatch:
    """One micro-batch of PTX data (pretraining or SFT text) and its target tokens on all processes together."""

    batch: Batch
    num_tokens: int


# ---------------------------------------------------------------------------------------------- models


def reward_functions(cfg: PPOConfig, device: torch.device) -> tuple[list[RewardFn], list[float]]:
    return load_rewards(cfg.ppo.reward_funcs, cfg.ppo.reward_weights, device=device)


def build_critic(cfg: PPOConfig, policy: LlamaForCausalLM, tokenizer: Tokenizer, device: torch.device
                 ) -> tuple[LlamaForScore, str]:
    """(critic, where it came from), built before the policy gets its LoRA adapters.

    reward_model: the first rm:PATH reward model, head included (TRL, InstructGPT): it already maps a completion to
    a number on the reward's scale. Its hidden size and tokenizer must be the policy's: the critic reads the
    policy's token ids. policy: the policy's decoder with a zero value head (every value starts at 0, so the
    first advantages are the rewards themselves rather than a random head's noise); under LoRA the decoder's
    base weights are the policy's own Parameters (one frozen copy for actor, critic and reference) and the
    critic trains its own adapters and head.
    """
    path = cfg.ppo.reward_model_path()
    init = cfg.ppo.critic_init if cfg.ppo.critic_init != "auto" else ("reward_model" if path else "policy")
    if init == "reward_model":
        assert path is not None  # PPOSection refuses reward_model without an rm: reward
        critic, rm_tokenizer = load_reward_model(path, dtype=DTYPES[cfg.model.dtype], device=device)
        if critic.config.hidden_size != policy.config.hidden_size:
            raise ConfigError(
                f"ppo.critic_init is reward_model, but the reward model {path} has hidden size "
                f"{critic.config.hidden_size} and the policy {policy.config.hidden_size}; the critic starts from "
                "the reward model and must match the policy. Use a reward model trained from the policy's family, "
                "or set ppo.critic_init to policy."
            )
        if rm_tokenizer.backend.get_vocab(with_added_tokens=True) != tokenizer.backend.get_vocab(with_added_tokens=True):
            raise ConfigError(
                f"ppo.critic_init is reward_model, but the reward model {path} has another tokenizer than the policy; "
                "the critic reads the policy's token ids. Set ppo.critic_init to policy (the rm: reward itself "
                "re-tokenises the text and stays correct)."
            )
        if cfg.model.gradient_checkpointing:
            critic.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
        return critic, f"reward_model:{path}"
    critic = score_model_from_causal_lm(policy, head_init="zero")  # shares the policy's decoder...
    shared = {id(p): p for p in policy.parameters()} if cfg.lora.enabled else {}
    critic.model = copy.deepcopy(policy.model, shared)  # ...until it gets its own (base Parameters kept under LoRA)
    return critic, "policy"


# ---------------------------------------------------------------------------------------------- batch statistics


def batch_moments(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, population variance, count) of `values` over the real positions of every process's batch, in
    float64 (two all-reduces: the mean first, then the squared deviations from it)."""
    real = mask.bool()
    x = values.double()
    sums = dist.all_reduce_sum(torch.stack([torch.where(real, x, 0.0).sum(), real.sum().double()]))
    count = int(sums[1])
    batch_mean = sums[0] / max(count, 1)
    squares = dist.all_reduce_sum(torch.where(real, (x - batch_mean) ** 2, 0.0).sum().reshape(1))
    return batch_mean, squares[0] / max(count, 1), count


def whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """`losses.ppo.masked_whiten` over the whole batch of every process (TRL whitens each process's share):
    (x - mean) / sqrt(unbiased var + 1e-8), the mean added back without `shift_mean`, 0 at padding."""
    batch_mean, variance, count = batch_moments(values, mask)
    if count < 2:
        raise DataError(f"Whitening needs at least 2 completion tokens in the batch; it has {count}. Raise "
                        "train.batch_size or rollout.max_completion_length.")
    whitened = (values.double() - batch_mean) * torch.rsqrt(variance * count / (count - 1) + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + batch_mean
    return torch.where(mask.bool(), whitened, 0.0).to(values.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """`losses.ppo.explained_variance` over every process's batch: 1 - Var[R - V] / Var[R] (NaN for constant R)."""
    _, var_returns, _ = batch_moments(returns, mask)
    _, var_residual, _ = batch_moments(returns - values, mask)
    return float(1 - var_residual / var_returns) if float(var_returns) > 0 else math.nan


# ---------------------------------------------------------------------------------------------- scores


def shape_scores(scores: torch.Tensor, stopped: torch.Tensor, cfg: PPOConfig, moments: RunningMoments
                 ) -> torch.Tensor:
    """The score each completion's last token receives: the reward, minus missing_eos_penalty where the completion
    did not stop, normalised by the running moments of every score so far (their update includes this batch's
    scores from every process), then clipped to +- reward_clip. TRL's order."""
    p = cfg.ppo
    scores = scores.double()
    if p.missing_eos_penalty is not None:
        scores = torch.where(stopped, scores, scores - p.missing_eos_penalty)
    if p.reward_norm:
        moments.update(torch.cat([torch.as_tensor(s) for s in dist.all_gather_object(scores.tolist())]))
        scores = moments.normalize(scores)
    if p.reward_clip is not None:
        scores = scores.clamp(-p.reward_clip, p.reward_clip)
    return scores.float()


def check_kl(kl_per_token: float, limit: float | None, iteration: int, last_checkpoint: Any) -> None:
    """Stop before an update when the rollout's KL per completion token is NaN / inf or above ppo.kl_stop."""
    if math.isfinite(kl_per_token) and (limit is None or kl_per_token <= limit):
        return
    what = "is not finite" if not math.isfinite(kl_per_token) else f"passed ppo.kl_stop {limit}"
    where = (f"The newest checkpoint, {last_checkpoint}, holds the policy that sampled this rollout (train.keep_last "
             "keeps earlier ones): resume it with --resume and a larger ppo.kl_coef (or ppo.adaptive_kl), or a larger "
             "ppo.kl_stop if the drift is intended; or start again with a lower optim.lr."
             if last_checkpoint else "No checkpoint was saved yet: start again with a lower optim.lr or a larger "
             "ppo.kl_coef.")
    raise KLDivergedError(
        f"Iteration {iteration}: the policy's KL to the reference is {kl_per_token:.4g} nats per completion token "
        f"and {what}; training stopped before this rollout's update, and nothing of it was saved. {where}"
    )


# ---------------------------------------------------------------------------------------------- losses


def make_loss_fns(cfg: PPOConfig, device: torch.device, kl_coef: Callable[[], float]
                  ) -> tuple[Callable[[Models, Any, int], tuple[torch.Tensor, dict]],
                             Callable[[Models, Any, int], tuple[torch.Tensor, dict]]]:
    """(loss_fn, critic_loss_fn) for engine.step. Per-token losses are summed / the step's completion tokens on
    every process (`aggregate(..., "dapo")`): the token mean over the minibatch, however it is split. With
    ppo.kl_penalty loss, kl_coef() (the controller's value for this rollout) times the live policy's KL estimate
    to the reference joins the per-token loss."""
    p, temperature = cfg.ppo, cfg.rollout.temperature

    def value_terms(models: Models, batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        assert batch.old_values is not None and batch.returns is not None
        values = completion_values(models["critic"], batch).float()
        per_token, clipped = clipped_value_loss(values, batch.old_values, batch.returns,
                                                cliprange_value=p.cliprange_value)
        tokens = max(1, batch.num_tokens)
        metrics = {"loss/value_avg": float((per_token.detach() * batch.mask).sum()) / tokens,
                   "val/clipfrac_avg": float((clipped & batch.mask).sum()) / tokens}
        return per_token, metrics

    def critic_loss_fn(models: Models, item: EpisodeBatch, count: int) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = item.to(device)
        per_token, metrics = value_terms(models, batch)
        return aggregate(p.vf_coef * per_token, batch.mask, "dapo", count=count), metrics

    def loss_fn(models: Models, item: EpisodeBatch | PTXBatch, count: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if isinstance(item, PTXBatch):  # the pretraining mix: a token mean over this step's PTX tokens
            logits, labels = lm_forward(models["policy"], item.batch)
            nll_sum, _ = causal_lm_loss(logits, labels, num_tokens=1)
            local = labels.numel()
            return p.ptx_coef * nll_sum / item.num_tokens, {"loss/ptx": mean(float(nll_sum.detach()) / max(local, 1),
                                                                              weight=local)}
        batch = item.to(device)
        assert batch.old_logps is not None
        logps, entropy = completion_logprobs(models["policy"], batch, temperature=temperature, with_entropy=True,
                                             entropy_grad=p.entropy_coef > 0)
        assert entropy is not None
        policy_tok, ratio = clipped_surrogate(logps, batch.old_logps, batch.advantages, epsilon=p.cliprange,
                                              dual_clip=p.dual_clip)
        value_tok, metrics = value_terms(models, batch)
        per_token = policy_tok + p.vf_coef * value_tok
        if p.entropy_coef > 0:
            per_token = per_token - p.entropy_coef * entropy
        kl_metrics = {}
        if p.kl_penalty == "loss":
            assert batch.ref_logps is not None
            token_kl = kl_estimate(logps, batch.ref_logps, p.kl_estimator)
            per_token = per_token + kl_coef() * token_kl
            kl_metrics["loss/kl_avg"] = float((token_kl.detach() * batch.mask).sum()) / max(1, batch.num_tokens)
        loss = aggregate(per_token, batch.mask, "dapo", count=count)
        with torch.no_grad():
            mask, tokens = batch.mask, max(1, batch.num_tokens)
            advantages = batch.advantages
            clipped = advantages * ratio > advantages * ratio.clamp(1 - p.cliprange, 1 + p.cliprange)
            log_ratio = logps.detach() - batch.old_logps
            metrics |= {
                "loss/policy_avg": float((policy_tok.detach() * mask).sum()) / tokens,
                "policy/clipfrac_avg": float((clipped & mask).sum()) / tokens,
                "policy/approxkl_avg": float((0.5 * log_ratio.pow(2) * mask).sum()) / tokens,
                "policy/entropy_avg": float((entropy.detach() * mask).sum()) / tokens,
                "val/ratio": float((ratio.detach() * mask).sum()) / tokens,
            } | kl_metrics
        return loss, metrics

    return loss_fn, critic_loss_fn


def average_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The optimisation's metrics over its steps: means (the last step's learning rates and count), and
    val/ratio_var, the variance of the steps' mean ratios (TRL's, over its minibatches)."""
    out = dict(rows[-1])
    for key in rows[-1]:
        if not key.startswith(("lr", "num_")):
            out[key] = sum(r[key] for r in rows) / len(rows)
    if "val/ratio" in out:
        ratios = torch.tensor([r["val/ratio"] for r in rows], dtype=torch.float64)
        out["val/ratio_var"] = float(ratios.var()) if len(rows) > 1 else 0.0
    return out


def no_grad_forward(whole: EpisodeBatch, forward: Callable[[EpisodeBatch], torch.Tensor], size: int,
                    device: torch.device, precision: str, context: Callable[[], Any] | None = None) -> torch.Tensor:
    """forward(micro-batch) [E, C] for every episode of `whole`, in micro-batches, without gradients, in the
    training forward's precision; float32 on the CPU."""
    parts = []
    with torch.no_grad(), autocast(precision, device):
        for start in range(0, whole.num_sequences, size):
            part = whole.select(range(start, min(start + size, whole.num_sequences))).to(device)
            with context() if context is not None else contextlib.nullcontext():
                parts.append(forward(part).float().cpu())
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------- train


def train(cfg: PPOConfig) -> RunResult:
    info = setup(cfg.train)
    p = cfg.ppo
    functions, weights = reward_functions(cfg, info.device)  # a bad reward spec fails before the policy loads

    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    policy, tokenizer = build_model(cfg.model, tokenizer, device=info.device)
    set_chat_template(tokenizer, cfg.chat_template)
    critic, critic_source = build_critic(cfg, policy, tokenizer, info.device)
    critic_base = cfg.ppo.reward_model_path() if critic_source.startswith("reward_model") else cfg.model.path
    if cfg.lora.enabled and cfg.train.strategy == "fsdp2" and critic_source == "policy":
        raise ConfigError("PPO with LoRA shares the policy's frozen base with the critic, which FSDP2 cannot shard "
                          "twice; use train.strategy ddp, or ppo.critic_init reward_model.")
    # The reference is the starting policy: its adapters disabled under LoRA, else a frozen copy.
    reference = None if cfg.lora.enabled else copy.deepcopy(policy)
    add_lora(policy, cfg.lora)
    add_lora(critic, cfg.lora)

    source = cfg.data.single_source("ppo")
    items = load_prompts(read_records(source, cfg.data), tokenizer, source=source,
                         max_prompt_length=cfg.rollout.max_prompt_length, system_prompt=cfg.rollout.system_prompt,
                         require_answer=False, log=info.is_main)
    g, world = cfg.rollout.num_generations, info.world_size
    prompts_per_step = cfg.train.batch_size // g
    if prompts_per_step % world or (cfg.train.batch_size // world) % p.num_mini_batches:
        raise DataError(f"train.batch_size {cfg.train.batch_size} completions ({prompts_per_step} prompts) do not split "
                        f"into {world} processes x {p.num_mini_batches} minibatches; make train.batch_size / "
                        "rollout.num_generations a multiple of the process count, and each process's share a "
                        "multiple of ppo.num_mini_batches.")
    check_prompt_batch(cfg, len(items), prompts_per_step)
    prompts = StepBatches(items, collate=list, batch_size=prompts_per_step, micro_batch_size=prompts_per_step // world,
                          seed=cfg.train.seed, rank=info.rank, world_size=world, source=cfg.data.train)
    iterations = total_steps(cfg.train, prompts.steps_per_epoch)

    # PTX data: one micro-batch per PPO minibatch (ptx_coef > 0), and held-out records for eval/ptx_loss.
    ptx_batches, ptx_eval_fn = None, None
    micro = cfg.train.micro_batch_size
    if cfg.ptx.train:
        try:
            ptx_train, ptx_eval = load_examples(cfg.ptx, tokenizer)
        except DataError as e:
            raise DataError(f"ptx.train (the PTX data): {e}") from None
        ptx_items, ptx_collate = batching(ptx_train, cfg.ptx, tokenizer)
        if p.ptx_coef > 0:
            ptx_batches = StepBatches(ptx_items, collate=ptx_collate, batch_size=micro * world, micro_batch_size=micro,
                                      seed=cfg.train.seed, rank=info.rank, world_size=world, source=cfg.ptx.train)
        if ptx_eval:
            eval_items, _ = batching(ptx_eval, cfg.ptx, tokenizer)

            def ptx_eval_batch(models: Models, batch: Batch) -> tuple[dict[str, float], int]:
                logits, labels = lm_forward(models["policy"], batch)
                nll_sum, _ = causal_lm_loss(logits, labels, num_tokens=1)
                return {"ptx_loss": float(nll_sum)}, labels.numel()

            ptx_eval_fn = sharded_eval(eval_items, ptx_collate, micro, info, ptx_eval_batch)

    sampling = cfg.rollout.sampling_params(tokenizer)
    use_rollout_logps = cfg.rollout.old_logprobs_from_rollout(p.old_logprobs, cfg.train.precision)
    steps_per_iteration = p.num_ppo_epochs * p.num_mini_batches
    critic_optim = dataclasses.replace(cfg.optim, lr=p.critic_lr) if p.critic_lr is not None else cfg.optim

    run_dir = prepare_run_dir(cfg, info)
    if info.is_main:
        tokenizer.save(run_dir / "tokenizer")
    frozen = {"reference": Frozen(reference, source=f"{cfg.model.path}:starting-policy")} if reference is not None else {}
    engine = Engine(
        {"policy": Trainable(policy, cfg.optim,
                             total_steps=max(1, (iterations - p.critic_warmup_steps) * steps_per_iteration)),
         "critic": Trainable(critic, critic_optim, total_steps=iterations * steps_per_iteration)},
        cfg.train, run_dir=run_dir, total_steps=iterations, frozen=frozen, dist_info=info,
        count_fn=lambda item: item.num_tokens if isinstance(item, EpisodeBatch) else 0, count_unit="tokens")
    # The forgetting monitor at each evaluation: eval/ptx_loss and the eval section's capabilities.
    eval_fn = combine_evals(ptx_eval_fn, task_eval(cfg.eval, tokenizer, info, partial(engine.generation_model, "policy")))
    controller = (AdaptiveKLController(p.kl_coef, p.target_kl, p.horizon) if p.adaptive_kl
                  else FixedKLController(p.kl_coef))
    loss_fn, critic_loss_fn = make_loss_fns(cfg, info.device, lambda: controller.value)
    moments = RunningMoments()
    stateful: dict[str, Any] = {"prompts": prompts, "kl_controller": controller, "reward_moments": moments}
    if ptx_batches is not None:
        stateful["ptx"] = ptx_batches
    engine.start(**stateful)  # with train.resume: models, optimizers, these objects and every RNG come back
    stream = iter(prompts)
    ptx_stream: Iterator[list[Batch]] | None = iter(ptx_batches) if ptx_batches is not None else None
    if engine.iteration == 0:
        engine.log(engine.evaluate_if_due(eval_fn))
    forward = dict(size=micro, device=info.device, precision=cfg.train.precision)

    def logps_under(model: nn.Module, batch: EpisodeBatch) -> torch.Tensor:
        return completion_logprobs(model, batch, temperature=cfg.rollout.temperature)[0]

    for iteration in engine.iterations():
        started = time.perf_counter()
        # 1. Rollout, scores, and the no-grad forwards: old policy, reference and critic (one switch each).
        with engine.generation_model("policy") as live, engine.generation_model("critic") as live_critic:
            [batch] = next(stream)  # this process's prompts
            with sampling_model(live, precision=cfg.train.precision, device=info.device,
                                rows=len(batch) * g) as sampler:
                rollout = generate_rollout(sampler, tokenizer, [item.prompt_ids for item in batch], sampling,
                                           group_size=g)
            del sampler  # a bf16 sampling copy goes now, not when the next iteration replaces it
            raw_scores, reward_values = score_rollout(rollout, functions, weights, reward_prompts(batch),
                                                      prompt_fields(batch))
            n = len(rollout.completions)
            [whole] = episode_batches(rollout, n, advantages=torch.zeros(n), pad_id=tokenizer.pad_token_id,
                                      old_logps=rollout_logprobs(rollout) if use_rollout_logps else None)
            if not use_rollout_logps:
                whole.old_logps = no_grad_forward(whole, partial(logps_under, live), **forward)
            if reference is not None:
                whole.ref_logps = no_grad_forward(whole, partial(logps_under, reference), **forward)
            else:  # LoRA: the reference is the live policy with its adapters off (no second copy of the weights)
                whole.ref_logps = no_grad_forward(whole, partial(logps_under, live), **forward,
                                                  context=partial(disable_adapters, live))
            whole.old_values = no_grad_forward(whole, partial(completion_values, live_critic), **forward)

        # 2. Per-token rewards (the score on the last token, -kl_coef * KL on every token), GAE, whitening.
        assert whole.old_logps is not None and whole.ref_logps is not None
        mask = whole.mask
        stopped = torch.tensor([c.finish_reason == "stop" for c in rollout.completions])
        scores = shape_scores(raw_scores, stopped, cfg, moments)
        kl_coef = controller.value
        rewards, kl = per_token_rewards(scores, whole.old_logps, whole.ref_logps, mask,
                                        kl_coef=kl_coef if p.kl_penalty == "reward" else 0.0,
                                        kl_estimator=p.kl_estimator)
        sequence_kl = kl.sum(-1)  # [N]
        lengths = mask.sum(-1)
        drift = reduce_metrics({"kl_per_token": mean(float(kl.sum()) / max(1, int(lengths.sum())),
                                                     weight=int(lengths.sum())),
                                "objective/kl": mean(float(sequence_kl.mean()), weight=n)})
        check_kl(drift["kl_per_token"], p.kl_stop, iteration, engine.last_checkpoint)
        if p.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, whole.old_values, mask, gamma=p.gamma, lam=p.lam)
        whole.advantages, whole.returns = whiten(advantages, mask), returns
        rollout_seconds = time.perf_counter() - started

        # 3. num_ppo_epochs passes, each over num_mini_batches shuffled minibatches: one optimizer step each.
        warmup = iteration <= p.critic_warmup_steps
        size = n // p.num_mini_batches
        rows = []
        for _ in range(p.num_ppo_epochs):
            order = torch.randperm(n)
            for start in range(0, n, size):
                rows_of = order[start : start + size]
                micro_batches: list[Any] = [whole.select(rows_of[i : i + micro]) for i in range(0, size, micro)]
                if warmup:  # the critic alone: the policy's weights and optimizer do not move
                    rows.append(engine.step(micro_batches, critic_loss_fn, models=["critic"]))
                    continue
                if ptx_stream is not None:  # first: under DDP the last micro-batch, which syncs the gradients,
                    [ptx_batch] = next(ptx_stream)  # must run the critic too
                    ptx_tokens = int(dist.all_reduce_sum(torch.tensor(float(ptx_batch.num_tokens))))
                    micro_batches.insert(0, PTXBatch(ptx_batch, ptx_tokens))
                rows.append(engine.step(micro_batches, loss_fn))
        optimize_seconds = time.perf_counter() - started - rollout_seconds
        if not warmup:  # the policy did not move during warm-up: its KL says nothing about kl_coef
            controller.update(drift["objective/kl"], n_steps=n * world)

        # 4. Metrics under TRL's PPO names, reduced over processes.
        row = average_rows(rows)
        entropy = -(whole.old_logps * mask).sum(-1)  # [N] the rollout's sequence entropy estimate
        non_score = (-kl_coef * kl).sum(-1)
        truncated = (~stopped).float()
        completion_lengths = lengths.float()
        rollout_row: dict[str, Any] = {
            "objective/entropy": mean(float(entropy.mean()), weight=n),
            "objective/non_score_reward": mean(float(non_score.mean()), weight=n),
            "objective/scores": mean(float(scores.mean()), weight=n),
            "reward": mean(float(raw_scores.mean()), weight=n),
            "val/num_eos_tokens": total(float(stopped.sum())),
            "completions/mean_length": mean(float(completion_lengths.mean()), weight=n),
            "completions/min_length": minimum(float(completion_lengths.min())),
            "completions/max_length": maximum(float(completion_lengths.max())),
            "completions/clipped_ratio": mean(float(truncated.mean()), weight=n),
        }
        for name, column in reward_values.items():
            applicable = torch.tensor(column, dtype=torch.float64)
            applicable = applicable[~applicable.isnan()]
            k = int(applicable.numel())
            rollout_row[f"rewards/{name}/mean"] = mean(float(applicable.mean()) if k else 0.0, weight=k)
        row.update(reduce_metrics(rollout_row, info.device))
        row["objective/kl"] = drift["objective/kl"]
        row["objective/rlhf_reward"] = row["objective/scores"] + row["objective/non_score_reward"]
        row["objective/kl_coef"] = kl_coef
        row["val/explained_variance"] = explained_variance(whole.old_values, returns, mask)
        seconds = reduce_metrics({"time/rollout_s": maximum(rollout_seconds),
                                  "time/optimization_s": maximum(optimize_seconds)})
        row.update(seconds)
        row["episodes_per_s"] = n * world / max(seconds["time/rollout_s"] + seconds["time/optimization_s"], 1e-9)
        row |= engine.evaluate_if_due(eval_fn)
        engine.log(row)
        engine.save_if_due()
    metrics = engine.finish()
    # The critic too (a value model: HF LlamaForSequenceClassification), for a later run's critic or inspection.
    export(critic, tokenizer, run_dir, lora=cfg.lora, base_model=critic_base, info=info, folder="critic",
           adapter_folder="critic_adapter")
    final = export(policy, tokenizer, run_dir, lora=cfg.lora, base_model=cfg.model.path, info=info)
    return RunResult(run_dir=run_dir, final_model_dir=final, metrics=metrics)
