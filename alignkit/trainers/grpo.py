"""GRPO: RL with verifiable rewards, G sampled completions per prompt and a group baseline (no critic).

Each iteration takes this rank's share of train.batch_size / G prompts, samples G completions of each from the live
policy (one prefill per prompt), scores them with the reward functions, turns rewards into advantages (grpo, rloo
or reinforce_pp), and takes grpo.num_iterations optimizer steps over the rollout with the clipped surrogate
(`alignkit.losses.policy`), optionally with a KL term to the frozen starting policy. docs/concepts/grpo.md has the
objective; the loop below reads top to bottom on the engine's step API.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch

from alignkit.engine import (
    Engine,
    Frozen,
    Models,
    StepBatches,
    Trainable,
    maximum,
    mean,
    minimum,
    reduce_metrics,
)
from alignkit.engine import distributed as dist
from alignkit.errors import DataError
from alignkit.losses.policy import (
    STD_EPS,
    aggregate,
    clipped_surrogate,
    counts_tokens,
    group_advantages,
    kl_estimate,
    reinforce_pp_advantages,
)
from alignkit.rewards.verifiable import RewardFn, load_rewards, overlong_penalty
from alignkit.rollout import (
    EpisodeBatch,
    Rollout,
    attach_logprobs,
    completion_logprobs,
    episode_batches,
    generate_rollout,
    rollout_logprobs,
    sampling_model,
    score_rollout,
)
from alignkit.rollout.prompts import load_prompts, prompt_fields, reward_prompts
from alignkit.tokenizer import set_chat_template
from alignkit.trainers.common import (
    RunResult,
    add_lora,
    build_model,
    load_tokenizer,
    read_records,
    setup,
    total_steps,
)
from alignkit.trainers.rl_configs import GRPOConfig
from alignkit.trainers.stage import check_prompt_batch, export, prepare_run_dir

Config = GRPOConfig


def reward_functions(cfg: GRPOConfig, device: torch.device) -> tuple[list[RewardFn], list[float]]:
    functions, weights = load_rewards(cfg.grpo.reward_funcs, cfg.grpo.reward_weights, device=device)
    if cfg.grpo.overlong_cache is not None:
        functions.append(overlong_penalty(cfg.rollout.max_completion_length, cfg.grpo.overlong_cache))
        weights.append(1.0)
    return functions, weights


def make_loss_fn(cfg: GRPOConfig, device: torch.device) -> Callable[[Models, EpisodeBatch, int], tuple[torch.Tensor, dict]]:
    g, temperature = cfg.grpo, cfg.rollout.temperature
    kl_in_loss = g.beta > 0 and g.advantage_estimator != "reinforce_pp"
    high = g.epsilon if g.epsilon_high is None else g.epsilon_high

    def loss_fn(models: Models, batch: EpisodeBatch, count: int) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = batch.to(device)
        logps, entropy = completion_logprobs(models["policy"], batch, temperature=temperature, with_entropy=True)
        assert entropy is not None
        old = batch.old_logps if batch.old_logps is not None else logps.detach()
        per_token, ratio = clipped_surrogate(logps, old, batch.advantages, epsilon=g.epsilon, epsilon_high=g.epsilon_high)
        mask = batch.mask
        tokens = max(1, int(mask.sum()))
        metrics: dict[str, Any] = {}
        if kl_in_loss:
            assert batch.ref_logps is not None
            kl = kl_estimate(logps, batch.ref_logps, g.kl_estimator)
            per_token = per_token + g.beta * kl
            metrics["kl"] = mean(float((kl.detach() * mask).sum()) / tokens, weight=tokens)
        loss = aggregate(per_token, mask, g.loss_type, count=count, max_completion_length=cfg.rollout.max_completion_length)
        with torch.no_grad():
            advantages = batch.advantages.expand_as(ratio)
            low = (ratio < 1 - g.epsilon) & (advantages < 0) & mask
            high_clipped = (ratio > 1 + high) & (advantages > 0) & mask
            for key, hits in (("clip_ratio/low_mean", low), ("clip_ratio/high_mean", high_clipped),
                              ("clip_ratio/region_mean", low | high_clipped)):
                metrics[key] = mean(float(hits.sum()) / tokens, weight=tokens)
            metrics["entropy"] = mean(float((entropy * mask).sum()) / tokens, weight=tokens)
            metrics["ratio/max"] = maximum(float(ratio.masked_fill(~mask, 0).max()))
        return loss, metrics

    return loss_fn


def dynamic_sample(rollout: Rollout, rewards: torch.Tensor, values: dict[str, list[float]],
                   draw: Callable[[], tuple[Rollout, torch.Tensor, dict[str, list[float]]]], group_size: int,
                   groups_wanted: int, max_rounds: int) -> tuple[Rollout, torch.Tensor, dict[str, list[float]], list]:
    """DAPO's dynamic sampling: keep the groups whose rewards differ (the others have zero advantage and teach
    nothing) and draw more prompts until `groups_wanted` are kept or `max_rounds` draws are spent.

    Every process draws as often as the one that needs most (the prompt streams stay in step) and keeps the same
    number of groups (the same number of micro-batches each: FSDP2's collectives must match). When no draw has a
    group with differing rewards, the first draw is trained on as it is (zero advantages)."""
    first = (rollout, rewards, values)
    extra: list[tuple[Rollout, torch.Tensor, dict[str, list[float]]]] = []

    def informative(r: Rollout, rw: torch.Tensor, v: dict[str, list[float]]) -> tuple[Rollout, torch.Tensor, dict]:
        keep = [i for i in range(len(r.prompt_ids)) if float(rw.view(-1, group_size)[i].std()) > 0]
        rows = [i * group_size + j for i in keep for j in range(group_size)]
        return r.groups(keep), rw[rows], {k: [col[i] for i in rows] for k, col in v.items()}

    kept = informative(*first)
    def fewest() -> int:  # groups kept on the process that kept fewest
        return int(dist.all_reduce(torch.tensor(float(len(kept[0].prompt_ids))), op="min"))

    while fewest() < groups_wanted and len(extra) + 1 < max_rounds:
        extra.append(draw())
        more = informative(*extra[-1])
        kept = (kept[0] + more[0], torch.cat([kept[1], more[1]]), {k: kept[2][k] + more[2][k] for k in kept[2]})
    have = fewest()
    if have == 0:
        return (*first, extra)
    take = min(have, groups_wanted)
    rows = take * group_size
    return kept[0].groups(range(take)), kept[1][:rows], {k: v[:rows] for k, v in kept[2].items()}, extra


def merge_draws(draws: list[tuple[Rollout, torch.Tensor, dict[str, list[float]]]]
                ) -> tuple[torch.Tensor, dict[str, list[float]], list[int], list[bool]]:
    """(rewards, values, lengths, truncated) of every completion sampled in an iteration."""
    rewards = torch.cat([d[1] for d in draws])
    values = {k: [x for d in draws for x in d[2][k]] for k in draws[0][2]}
    completions = [c for d in draws for c in d[0].completions]
    return rewards, values, [len(c.token_ids) for c in completions], [c.finish_reason == "length" for c in completions]


def rollout_metrics(rewards: torch.Tensor, values: dict[str, list[float]], lengths: list[int], truncated: list[bool],
                    group_size: int) -> dict[str, Any]:
    """TRL's GRPO names, combined over ranks as each needs (means by completions, min / max of lengths)."""
    n = len(lengths)
    grouped = rewards.view(-1, group_size)
    metrics: dict[str, Any] = {
        "reward": mean(float(rewards.mean()), weight=n),
        "reward_std": mean(float(grouped.std(dim=1).mean()), weight=grouped.shape[0]),
        "frac_reward_zero_std": mean(float((grouped.std(dim=1) == 0).float().mean()), weight=grouped.shape[0]),
        "completions/mean_length": mean(sum(lengths) / n, weight=n),
        "completions/min_length": minimum(min(lengths)),
        "completions/max_length": maximum(max(lengths)),
        "completions/clipped_ratio": mean(sum(truncated) / n, weight=n),
    }
    terminated = [length for length, cut in zip(lengths, truncated) if not cut]
    metrics["completions/mean_terminated_length"] = mean(sum(terminated) / max(1, len(terminated)),
                                                         weight=len(terminated))
    for name, column in values.items():
        applicable = torch.tensor(column, dtype=torch.float64)
        applicable = applicable[~applicable.isnan()]
        k = int(applicable.numel())
        metrics[f"rewards/{name}/mean"] = mean(float(applicable.mean()) if k else 0.0, weight=k)
        metrics[f"rewards/{name}/std"] = mean(float(applicable.std()) if k > 1 else 0.0, weight=k)
    return metrics


def train(cfg: GRPOConfig) -> RunResult:
    info = setup(cfg.train)
    functions, weights = reward_functions(cfg, info.device)  # a bad reward spec fails before the policy loads

    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    model, tokenizer = build_model(cfg.model, tokenizer, device=info.device)
    set_chat_template(tokenizer, cfg.chat_template)
    add_lora(model, cfg.lora)
    # The reference (for the KL term) is the starting policy: its adapters disabled under LoRA, else a frozen copy.
    reference = None
    if cfg.grpo.beta > 0 and not cfg.lora.enabled:
        reference = copy.deepcopy(model).eval().requires_grad_(False)

    source = cfg.data.single_source("grpo")
    items = load_prompts(read_records(source, cfg.data), tokenizer, source=source,
                         max_prompt_length=cfg.rollout.max_prompt_length, system_prompt=cfg.rollout.system_prompt,
                         log=info.is_main)
    g = cfg.rollout.num_generations
    prompts_per_step = cfg.train.batch_size // g
    if prompts_per_step % info.world_size:
        raise DataError(f"{prompts_per_step} prompts per iteration do not split over {info.world_size} processes; "
                        "make train.batch_size / rollout.num_generations a multiple of the process count.")
    check_prompt_batch(cfg, len(items), prompts_per_step)
    prompts = StepBatches(items, collate=list, batch_size=prompts_per_step,
                          micro_batch_size=prompts_per_step // info.world_size, seed=cfg.train.seed,
                          rank=info.rank, world_size=info.world_size)
    iterations = total_steps(cfg.train, prompts.steps_per_epoch)
    sampling = cfg.rollout.sampling_params(tokenizer)
    use_rollout_logps = cfg.rollout.old_logprobs_from_rollout(cfg.grpo.old_logprobs, cfg.train.precision)
    # One optimizer step per rollout is on-policy: the old policy is the policy of that step's own forward, whose
    # log-probs (detached) serve, with no extra forward (TRL's shortcut). REINFORCE++ needs them before the step.
    recompute_old_logps = not use_rollout_logps and not (
        cfg.grpo.old_logprobs == "auto" and cfg.grpo.num_iterations == 1
        and cfg.grpo.advantage_estimator != "reinforce_pp")
    count_fn = (lambda b: b.num_tokens) if counts_tokens(cfg.grpo.loss_type) else (lambda b: b.num_sequences)

    run_dir = prepare_run_dir(cfg, info)
    if info.is_main:
        tokenizer.save(run_dir / "tokenizer")
    frozen = {"reference": Frozen(reference, source=f"{cfg.model.path}:starting-policy")} if reference is not None else {}
    engine = Engine({"policy": Trainable(model, cfg.optim, total_steps=iterations * cfg.grpo.num_iterations)},
                    cfg.train, run_dir=run_dir, total_steps=iterations, frozen=frozen, dist_info=info,
                    count_fn=count_fn, count_unit="tokens" if counts_tokens(cfg.grpo.loss_type) else "sequences")
    loss_fn = make_loss_fn(cfg, info.device)
    engine.start(prompts=prompts)
    stream = iter(prompts)

    for _ in engine.iterations():
        started = time.perf_counter()
        # One switch to the generation model for the rollout and the no-grad forwards (one all-gather under FSDP2).
        with engine.generation_model("policy") as policy:
            with sampling_model(policy, precision=cfg.train.precision, device=info.device,
                                rows=prompts_per_step // info.world_size * g) as sampler:
                def draw(model: torch.nn.Module = sampler) -> tuple[Rollout, torch.Tensor, dict[str, list[float]]]:
                    [batch] = next(stream)  # this rank's prompts
                    rollout = generate_rollout(model, tokenizer, [item.prompt_ids for item in batch], sampling,
                                               group_size=g)
                    rewards, values = score_rollout(rollout, functions, weights, reward_prompts(batch),
                                                    prompt_fields(batch))
                    return rollout, rewards.float(), values

                rollout, rewards, values = draw()
                sampled = [(rollout, rewards, values)]  # everything sampled this iteration: the logged metrics
                if cfg.grpo.dynamic_sampling:
                    rollout, rewards, values, extra = dynamic_sample(rollout, rewards, values, draw, g,
                                                                     prompts_per_step // info.world_size,
                                                                     cfg.grpo.max_sampling_rounds)
                    sampled += extra
            del sampler, draw  # a bf16 sampling copy goes now, not when the next iteration replaces it
            lengths = [len(c.token_ids) for c in rollout.completions]
            truncated = [c.finish_reason == "length" for c in rollout.completions]
            loss_mask = torch.tensor([not cut for cut in truncated]) if cfg.grpo.mask_truncated_completions else None

            # Advantages, and the old policy's and reference's log-probs of every completion token.
            est = cfg.grpo.advantage_estimator
            advantages = torch.zeros(len(lengths))
            if est in ("grpo", "rloo"):
                if cfg.grpo.scale_rewards == "batch" and info.world_size > 1:
                    everyone = torch.cat([torch.as_tensor(r) for r in dist.all_gather_object(rewards.tolist())])
                    advantages = group_advantages(rewards, g, estimator=est, scale_rewards="none") / (everyone.std() + STD_EPS)
                else:
                    advantages = group_advantages(rewards, g, estimator=est, scale_rewards=cfg.grpo.scale_rewards)
            batches = episode_batches(rollout, cfg.train.micro_batch_size, advantages=advantages, loss_mask=loss_mask,
                                      old_logps=rollout_logprobs(rollout) if use_rollout_logps else None,
                                      pad_id=tokenizer.pad_token_id, share_prompts=cfg.rollout.share_prompt and g > 1)
            if recompute_old_logps:
                attach_logprobs(batches, policy, into="old_logps", temperature=cfg.rollout.temperature,
                                device=info.device)
            if cfg.grpo.beta > 0:
                from alignkit.model.lora import disable_adapters

                ref_model = reference if reference is not None else policy
                attach_logprobs(batches, ref_model, into="ref_logps", temperature=cfg.rollout.temperature,
                                device=info.device, context=(lambda: disable_adapters(policy)) if reference is None else None)
        if est == "reinforce_pp":
            old = torch.cat([b.old_logps for b in batches])  # type: ignore[misc]
            mask = torch.cat([b.mask for b in batches])
            ref = torch.cat([b.ref_logps for b in batches]) if cfg.grpo.beta > 0 else old  # type: ignore[misc]
            token_advantages = reinforce_pp_advantages(rewards, kl_estimate(old, ref, cfg.grpo.kl_estimator), mask,
                                                       kl_coef=cfg.grpo.beta)
            start = 0
            for b in batches:
                b.advantages = token_advantages[start : start + b.num_sequences].float()
                start += b.num_sequences
        rollout_seconds = time.perf_counter() - started

        rows = [engine.step(batches, loss_fn) for _ in range(cfg.grpo.num_iterations)]
        optimize_seconds = time.perf_counter() - started - rollout_seconds
        row = dict(rows[-1])
        for key in ("loss", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "kl"):
            if key in row:
                row[key] = sum(r[key] for r in rows) / len(rows)
        row.update(reduce_metrics(rollout_metrics(*merge_draws(sampled), g), info.device))
        if cfg.grpo.dynamic_sampling:
            row.update(reduce_metrics({"dynamic_sampling/draws": mean(len(sampled)),
                                       "dynamic_sampling/groups_kept": mean(len(rollout.prompt_ids))}, info.device))
        seconds = reduce_metrics({"time/rollout_s": maximum(rollout_seconds),
                                  "time/optimization_s": maximum(optimize_seconds)})
        row.update(seconds)
        generated = sum(len(d[0].completions) for d in sampled) * info.world_size
        row["completions_per_s"] = generated / max(seconds["time/rollout_s"] + seconds["time/optimization_s"], 1e-9)
        engine.log(row)
        engine.save_if_due()
    metrics = engine.finish()
    final = export(model, tokenizer, run_dir, lora=cfg.lora, base_model=cfg.model.path, info=info)
    return RunResult(run_dir=run_dir, final_model_dir=final, metrics=metrics)
