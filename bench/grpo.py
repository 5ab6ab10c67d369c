"""GRPO throughput: alignkit vs TRL's GRPOTrainer on SmolLM2-135M-Instruct, GSM8K questions, same settings.

Both sides fully fine-tune the same checkpoint (the GGUF converted once with `alignkit convert`) with GRPO on the
same GSM8K word problems, rendered with the model's chat template (the same prompt tokens on both sides, SmolLM2's
default system message included): each step samples --num-generations completions of each of --batch-size prompts
(temperature 1, no top-k / top-p, at most --max-new-tokens new tokens), scores them with the same reward
(alignkit's `accuracy`: the final number against GSM8K's `#### n`), and takes one optimizer step over them with
the clipped surrogate (epsilon 0.2, advantages scaled by the group's std, --loss-type on both, no KL term: beta 0,
one iteration per rollout), micro-batches of --micro-batch-size completions accumulated to one step, AdamW lr 1e-6
constant, no warmup or weight decay, grad clipping at 1.0, and the same precision. --records defaults to 8, one
step's prompts at the default --batch-size, so every step trains on the same prompts on both sides. Each side runs
in its own subprocess, so peak RSS is that side's alone.

TRL 1.16's batch sizes count completions, as alignkit's `train.batch_size` does: per_device_train_batch_size is
the micro-batch, gradient_accumulation_steps = completions per step / micro-batch, and steps_per_generation is
left to default to gradient_accumulation_steps, so one generation batch of all the step's completions is sampled
per optimizer step. The samples are then on-policy and TRL runs no old-policy forward (its ratio is taken against
the detached log-probs of the training forward); alignkit in fp32 takes them from the sampler, and in bf16 (whose
sampling log-probs come from another numerical path) takes the step's own detached log-probs as TRL does: no
old-policy forward on either side (`grpo.old_logprobs: auto` with one iteration per rollout).

Reported per side, over the steps after `--warmup` untimed ones: completions/s and completion tokens/s (the
sides sample different completions, so their lengths differ; tokens/s is the fairer view of the work done), and
the split of a step: rollout (sampling, rewards, advantages and any no-grad log-prob forwards; on TRL its
`_generate_and_score_completions`), optimisation (from the end of the rollout to the end of the optimizer step)
and other (the rest of the step: data, logging). Also the mean completion length and reward, peak RSS, and the
alignkit / TRL ratios.

    python bench/grpo.py --quick                       # 3 steps of 2 prompts x 2 completions, 16 new tokens
    python bench/grpo.py --precision fp32              # the full comparison: 8 prompts x 4 completions, 64 tokens
    python bench/grpo.py --precision bf16
    python bench/grpo.py --device cuda --hf-dir DIR --precision bf16 --checkpointing off
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import harness
from harness import (
    import_trl,
    memory_cells,
    memory_header,
    memory_ratios,
    peak_memory,
    shared_data,
    timed_span,
    trl_step_timer,
    write_first_jsonl_records,
)

OPTIONS: list[harness.Option] = [
    ("--num-generations", {"type": int, "default": 4, "help": "completions sampled per prompt (the group)"}),
    ("--max-new-tokens", {"type": int, "default": 64, "help": "new tokens per completion at most"}),
    ("--micro-batch-size", {"type": int, "default": 8,
                            "help": "completions per forward / backward; the step's completions accumulate"}),
    ("--loss-type", {"choices": ["dapo", "grpo", "bnpo", "dr_grpo"], "default": "dapo",
                     "help": "the loss aggregation on both sides (TRL 1.16's default: dapo)"}),
]


def completions_per_step(args: argparse.Namespace) -> int:
    completions = args.batch_size * args.num_generations
    if completions % args.micro_batch_size:
        raise SystemExit(f"{args.batch_size} prompts x {args.num_generations} completions = {completions} do not "
                         f"split into micro-batches of {args.micro_batch_size}; change --micro-batch-size.")
    return completions


# ---------------------------------------------------------------------------------------------- timing


def throughput(step_times: list[float], rollout_s: Sequence[float], optimization_s: Sequence[float],
               tokens: Sequence[int], rewards: Sequence[float], completions: int, warmup: int) -> dict[str, float]:
    """Completions and completion tokens per second over the timed steps, and the mean split of a timed step."""
    seconds, steps = timed_span(step_times, warmup)
    rollout, optimization = sum(rollout_s[warmup:]) / steps, sum(optimization_s[warmup:]) / steps
    generated = sum(tokens[warmup:])
    return {
        "seconds": seconds,
        "timed_steps": steps,
        "completions_per_s": completions * steps / seconds,
        "completion_tokens_per_s": generated / seconds,
        "step_s": seconds / steps,
        "rollout_s": rollout,
        "optimization_s": optimization,
        "other_s": seconds / steps - rollout - optimization,
        "mean_completion_length": generated / (completions * steps),
        "mean_reward": sum(rewards) / len(rewards),  # over every step: a check that both sides learn the same task
    }


# ---------------------------------------------------------------------------------------------- alignkit side


def run_alignkit(args: argparse.Namespace) -> dict[str, Any]:
    from alignkit.config import config_from_dict
    from alignkit.trainers import run
    from alignkit.trainers.rl_configs import GRPOConfig

    completions = completions_per_step(args)
    cfg = config_from_dict(GRPOConfig, {
        "model": {"path": args.model_dir, "gradient_checkpointing": harness.alignkit_checkpointing(args)},
        "data": {"train": args.data},
        "optim": {"lr": 1e-6, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant", "max_grad_norm": 1.0},
        "rollout": {"num_generations": args.num_generations, "max_prompt_length": args.max_length,
                    "max_completion_length": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
        "grpo": {"reward_funcs": ["accuracy"], "advantage_estimator": "grpo", "scale_rewards": "group",
                 "loss_type": args.loss_type, "epsilon": 0.2, "num_iterations": 1, "beta": 0.0},
        "train": {"batch_size": completions, "micro_batch_size": args.micro_batch_size, "max_steps": args.steps,
                  "precision": args.precision, "log_every": 1, "report_to": [], "output_dir": args.work_dir,
                  "save_every": 0, "device": args.device},
    })
    rows = [r for r in run("grpo", cfg).metrics if r.get("step", 0) >= 1]
    stats = throughput([r["elapsed_s"] for r in rows], [r["time/rollout_s"] for r in rows],
                       [r["time/optimization_s"] for r in rows],
                       [round(r["completions/mean_length"] * completions) for r in rows], [r["reward"] for r in rows],
                       completions, args.warmup)
    return {**stats, **peak_memory(args.device)}


# ---------------------------------------------------------------------------------------------- TRL side


def accuracy_of_messages(prompts: list[Any], completions: list[list[dict[str, str]]], answer: list[str],
                         **fields: Any) -> list[float | None]:
    """alignkit's `accuracy` on TRL's conversational completions (a list of one assistant message each)."""
    from alignkit.rewards.verifiable import accuracy

    return accuracy(prompts, [messages[-1]["content"] for messages in completions], answer=answer)


def trl_records(path: str, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """The same prompts in TRL's conversational format, {prompt: messages, answer}; like alignkit, prompts longer
    than max_length tokens after the chat template are left out (TRL 1.16 has no prompt length limit)."""
    from alignkit.data import load_records
    from alignkit.data.formats import verifiable_prompts

    rows = []
    for prompt in verifiable_prompts(load_records(path), source=path):
        ids = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        if len(ids) <= max_length:
            rows.append({"prompt": prompt.messages, "answer": prompt.answer})
    return rows


def time_rollouts(trainer: Any) -> list[tuple[float, float, int]]:
    """Wrap the trainer's rollout (`_generate_and_score_completions`: sampling, rewards, advantages and its no-grad
    log-prob forwards) to record (start, end, completion tokens) of each call."""
    spans: list[tuple[float, float, int]] = []
    generate_and_score = trainer._generate_and_score_completions

    def timed(inputs: Any) -> Any:
        start = time.perf_counter()
        output = generate_and_score(inputs)
        harness.synchronize()
        spans.append((start, time.perf_counter(), int(output["completion_mask"].sum())))
        return output

    trainer._generate_and_score_completions = timed
    return spans


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    datasets, trl = import_trl()

    completions = completions_per_step(args)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    dataset = datasets.Dataset.from_list(trl_records(args.data, tokenizer, args.max_length))
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config = trl.GRPOConfig(
        output_dir=args.work_dir, per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=completions // args.micro_batch_size, num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, scale_rewards="group",
        loss_type=args.loss_type, epsilon=0.2, num_iterations=1, beta=0.0, learning_rate=1e-6, weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch", max_steps=args.steps,
        logging_steps=1, save_strategy="no", report_to=[], bf16=args.precision == "bf16",
        use_cpu=args.device == "cpu", gradient_checkpointing=harness.other_checkpointing(args), dataloader_num_workers=0,
        seed=0,
    )
    assert config.steps_per_generation == config.gradient_accumulation_steps  # one rollout per optimizer step
    times: list[float] = []
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[accuracy_of_messages], args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[trl_step_timer(times)])
    spans = time_rollouts(trainer)
    trainer.train()
    if len(spans) != len(times):
        raise SystemExit(f"TRL sampled {len(spans)} rollouts in {len(times)} optimizer steps; expected one each.")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    stats = throughput(times, [end - start for start, end, _ in spans],
                       [step_end - end for (_, end, _), step_end in zip(spans, times)],
                       [tokens for _, _, tokens in spans], rewards, completions, args.warmup)
    return {**stats, **peak_memory(args.device)}


# ---------------------------------------------------------------------------------------------- driver


def print_results(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    device = args.device
    print(f"\nGRPO SmolLM2-135M-Instruct, full fine-tune, {device}, GSM8K, {args.batch_size} prompts x "
          f"{args.num_generations} completions, <= {args.max_new_tokens} new tokens, micro-batch "
          f"{args.micro_batch_size}, {args.precision}, loss {args.loss_type}, beta 0, checkpointing "
          f"{args.checkpointing}, AdamW lr 1e-6, {args.steps} steps ({args.warmup} untimed)")
    print(f"{'':10s} {'compl/s':>8s} {'compl tok/s':>12s} {'step s':>7s} {'rollout s':>10s} {'optim s':>8s} "
          f"{'other s':>8s} {'mean len':>9s} {'reward':>7s} {memory_header(device)}")
    for side, r in results.items():
        print(f"{side:10s} {r['completions_per_s']:8.2f} {r['completion_tokens_per_s']:12.1f} {r['step_s']:7.2f} "
              f"{r['rollout_s']:10.2f} {r['optimization_s']:8.2f} {r['other_s']:8.2f} "
              f"{r['mean_completion_length']:9.1f} {r['mean_reward']:7.3f} {memory_cells(r, device)}")
    if "alignkit" in results and "trl" in results:
        a, t = results["alignkit"], results["trl"]
        print(f"ratio alignkit/TRL: completions/s {a['completions_per_s'] / t['completions_per_s']:.2f}x, "
              f"completion tokens/s {a['completion_tokens_per_s'] / t['completion_tokens_per_s']:.2f}x; time per "
              f"step: rollout {a['rollout_s'] / t['rollout_s']:.2f}x, optimisation "
              f"{a['optimization_s'] / t['optimization_s']:.2f}x; {memory_ratios(a, t, device)}")
    print("rollout: sampling, rewards, advantages, no-grad log-prob forwards; optim: the end of the rollout to the "
          "end of the optimizer step; other: the rest of the step (seconds per timed step).")
    print("mean len: completion tokens (the stop token included) per completion; the sides sample different "
          "completions, so compare tokens/s alongside completions/s.")


def main() -> None:
    ran = harness.main(__file__, __doc__ or "", {"alignkit": run_alignkit, "trl": run_trl},
                       source=shared_data() / "gsm8k" / "train.jsonl", write_data=write_first_jsonl_records,
                       defaults={"steps": 10, "batch_size": 8, "records": 8}, quick_records=2,
                       records_help="first N GSM8K questions (default 8: one step's prompts at the default --batch-size, so every step has the same prompts)",
                       options=OPTIONS, quick={"steps": 3, "num_generations": 2, "max_new_tokens": 16,
                                               "micro_batch_size": 4},
                       helps={"quick": "3 steps of 2 prompts x 2 completions, 16 new tokens, 1 untimed: a smoke run",
                              "batch_size": "prompts per step, each sampled --num-generations times",
                              "max_length": "prompts longer than this many tokens (chat template included) are left "
                                            "out, on both sides"})
    if ran is None:
        return
    args, results = ran
    print_results(args, results)
    harness.exit_status(args)


if __name__ == "__main__":
    main()
