"""PPO throughput: alignkit's `train ppo` vs TRL 1.12's `trl.experimental.ppo.PPOTrainer`, same settings.

Both sides fully fine-tune the same policy (the SmolLM2 GGUF converted once with `alignkit convert`, or --hf-dir,
e.g. random weights from bench/make_random_smollm2.py) with PPO on the same GSM8K questions rendered to the same
prompt tokens by the model's chat template (SmolLM2's default system message included), scored by the same reward
model: an HF `LlamaForSequenceClassification` directory (num_labels 1), by default written once by the driver from
the policy's weights with a seeded N(0, 1/sqrt(hidden + 1)) score head (TRL's head init), or a trained one with
--reward-model. As in TRL, the critic starts from the reward model (alignkit `ppo.critic_init: reward_model`),
the reference is a frozen copy of the starting policy, and there are four models on each side: policy and critic
trained, reference and reward frozen. Each step (one PPO iteration) samples one completion for each of
--batch-size prompts (at most --max-new-tokens new tokens, temperature --temperature, no top-k / top-p, stopping
at the tokenizer's EOS), runs the no-grad forwards (reference log-probs, the critic's values, the reward), builds
per-token rewards with the k1 KL penalty (kl_coef 0.05) and GAE advantages (gamma 1, lambda 0.95, whitened), then
takes --num-ppo-epochs x --num-mini-batches optimizer steps of policy and critic (clipped surrogate 0.2, clipped
value loss 0.2, vf_coef 0.1), each minibatch in micro-batches of --micro-batch-size episodes; AdamW lr 3e-6
constant, no warmup or weight decay, no gradient clipping (TRL's PPO loop never clips), the same precision.
--records defaults to one step's prompts, so every step trains on the same prompts on both sides. Each side runs
in its own subprocess, so peak RSS is that side's alone.

Settings, TRL 1.12 PPOConfig -> alignkit PPOConfig (B = --batch-size, m = --micro-batch-size):

    per_device_train_batch_size m, gradient_accumulation_steps B/m  -> train.batch_size B, micro_batch_size m
    total_episodes steps * B (num_total_batches = steps)             -> train.max_steps steps
    num_ppo_epochs, num_mini_batches                                 -> ppo.num_ppo_epochs, ppo.num_mini_batches
    response_length                                                  -> rollout.max_completion_length
    stop_token "eos"                                                 -> rollout.stop_token eos
    temperature (top_k 0 and top_p 1 are fixed in TRL's loop)       -> rollout.temperature, top_k 0, top_p 1
    kl_coef 0.05, kl_estimator k1                                    -> ppo.kl_coef, ppo.kl_estimator
    cliprange 0.2, cliprange_value 0.2, vf_coef 0.1                  -> ppo.cliprange, cliprange_value, vf_coef
    gamma 1.0, lam 0.95, whiten_rewards false                        -> ppo.gamma, ppo.lam, ppo.whiten_rewards
    missing_eos_penalty None                                         -> ppo.missing_eos_penalty null
    local_rollout_forward_batch_size B (one generate call)           -> (alignkit samples all prompts at once; its
                                                                        no-grad forwards run in micro-batches of m)
    value_model = reward_model's weights                             -> ppo.critic_init reward_model, rm:PATH
    learning_rate 3e-6, lr_scheduler_type constant, one optimizer     -> optim.lr 3e-6 constant; the critic has its
      over policy and value model                                       own AdamW at the same lr (critic_lr null)
    (no clipping in TRL's PPO loop)                                  -> optim.max_grad_norm null
    (no KL stop, no score normalisation in TRL)                      -> ppo.kl_stop null, ppo.reward_norm false

TRL 1.12 next to transformers 5.x, and what the TRL side does about it (each makes TRL do the work configured):

- bf16: transformers 5 no longer exports ACCELERATE_MIXED_PRECISION from `bf16=True`, and PPOTrainer builds its own
  `Accelerator` without a precision, so it would train in fp32; the side sets the variable first (and
  ACCELERATE_USE_CPU for --device cpu) and checks the accelerator's precision. Only the training forward of policy
  + value model is autocast (accelerate wraps the prepared model); TRL's generation and its reference, value and
  reward forwards call the unwrapped models and run in fp32 (checked: the side records whether autocast was on).
  alignkit also samples and runs the reward model in fp32, but its log-prob and value forwards in bf16 autocast,
  and in bf16 it recomputes the old policy's log-probs with one more forward (`ppo.old_logprobs: auto`); TRL takes
  them from the sampler's logits in both precisions, as alignkit does in fp32.
- gradient accumulation: TRL's loop steps the optimizer inside `accelerator.accumulate`, whose counter counts
  gradient_accumulation_steps = B/m micro-batches (the whole rollout, not a minibatch) and which also syncs every
  micro-batch while the dataloader sits on its last batch (with the default --records, every step). The side sets
  the accelerator's accumulation to the micro-batches of one minibatch and turns off the dataloader sync, so TRL
  takes exactly one optimizer step per minibatch (checked: it counts them).
- gradient checkpointing: PPOTrainer has its own __init__ and train() and neither turns it on; with --checkpointing
  on (the default, as in the other benchmarks) the side enables it on the policy and the value model, as alignkit
  does on its policy and critic (TRL turns the policy's off around generation and back on after).
- SmolLM2's pad token is its EOS (<|im_end|>), and TRL's PPO treats every pad id as padding (the prompts' own
  <|im_end|> would be masked out); the TRL side pads with <|endoftext|> (the unk token, absent from the prompts)
  and left-pads the prompts as TRL expects.

Reported per side, over the steps after `--warmup` untimed ones (default: 3 steps, 1 untimed): episodes/s
(completions, one per prompt) and generated tokens/s, peak RSS, and the mean step split: rollout (to the first
training forward), within it the sampling and the frozen-model forwards (logps: the reference, plus the old policy
in alignkit bf16; values: the critic's old values; reward: the reward model), optimisation (the PPO epochs) and
other (logging), with how many times each forward ran per step and the optimizer steps each side took (both
counted). alignkit's split is timed by wrapping `generate_rollout`, `no_grad_forward` and `score_rollout` in
alignkit.trainers.ppo, and read from its logged time/rollout_s and time/optimization_s; TRL's by wrapping
`batch_generation`, `forward` and `get_reward` in trl.experimental.ppo.ppo_trainer. The mean score is a sanity
check, not a parity check: alignkit's rm: reward re-renders prompt and completion and reads the score after the
chat template's end-of-turn tokens, TRL reads it at the last response token. Then the cost of a PPO step relative
to an alignkit GRPO step at equal generated tokens: a third process runs `alignkit train grpo` with the same
prompts, reward model, batch of completions (B/--grpo-generations prompts x --grpo-generations), lengths,
micro-batch and precision, one optimizer step per rollout (beta 0, no reference, as bench/grpo.py).

Set-up: later TRL releases (1.16, for one) no longer have PPO; install TRL 1.12 in a virtual environment that
sees this environment's packages (torch, transformers, accelerate, datasets, alignkit) and pass its Python:

    python -m venv --system-site-packages trl112-venv
    trl112-venv/bin/pip install --no-deps trl==1.12.0
    trl112-venv/bin/python -c "from trl.experimental.ppo import PPOConfig, PPOTrainer"

    python bench/ppo.py --quick --trl-python trl112-venv/bin/python     # a smoke run of all three sides
    python bench/ppo.py --precision fp32 --trl-python trl112-venv/bin/python
    python bench/ppo.py --precision bf16 --trl-python trl112-venv/bin/python
    python bench/ppo.py --device cuda --hf-dir DIR --checkpointing off --trl-python trl112-venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
from harness import (
    memory_cells,
    memory_header,
    memory_ratios,
    peak_memory,
    shared_data,
    timed_span,
    trl_step_timer,
    write_first_jsonl_records,
)

LR = 3e-6  # TRL's PPO default, and alignkit's
KL_COEF, CLIPRANGE, CLIPRANGE_VALUE, VF_COEF, GAMMA, LAM = 0.05, 0.2, 0.2, 0.1, 1.0, 0.95
# The parts of a rollout that are timed on both sides (seconds per step).
PARTS = ("generate", "logps", "values", "reward")

OPTIONS: list[harness.Option] = [
    ("--max-new-tokens", {"type": int, "default": 64, "help": "new tokens per completion at most (TRL "
                                                              "response_length)"}),
    ("--micro-batch-size", {"type": int, "default": 8,
                            "help": "episodes per training forward / backward; a minibatch's micro-batches "
                                    "accumulate"}),
    ("--num-ppo-epochs", {"type": int, "default": 4, "help": "passes over each rollout (TRL's default 4)"}),
    ("--num-mini-batches", {"type": int, "default": 1,
                            "help": "minibatches per pass, one optimizer step each (TRL's default 1)"}),
    ("--temperature", {"type": float, "default": 0.7, "help": "sampling temperature (TRL PPO's default 0.7)"}),
    ("--grpo-generations", {"type": int, "default": 4,
                            "help": "completions per prompt of the alignkit GRPO reference step (--batch-size "
                                    "completions in all)"}),
    ("--reward-model", {"default": None,
                        "help": "an HF LlamaForSequenceClassification directory with the policy's tokenizer (e.g. "
                                "an alignkit rm run's final/); default: the policy with a seeded random score head"}),
]


def check_sizes(args: argparse.Namespace) -> None:
    b, m, minibatches = args.batch_size, args.micro_batch_size, args.num_mini_batches
    if b % (minibatches * m):
        raise SystemExit(f"--batch-size {b} does not split into {minibatches} minibatches of micro-batches of {m}; "
                         "make it a multiple of --num-mini-batches x --micro-batch-size.")
    if b % args.grpo_generations or args.grpo_generations < 2:
        raise SystemExit(f"--grpo-generations {args.grpo_generations} must be at least 2 and divide --batch-size "
                         f"{b}.")


# ---------------------------------------------------------------------------------------------- shared


def make_reward_model(args: argparse.Namespace, model_dir: Path, work_root: Path) -> None:
    """The driver's `prepare`: unless --reward-model names one, write the policy with a seeded N(0, 1/sqrt(hidden
    + 1)) score head (TRL's init) as an HF LlamaForSequenceClassification directory that both sides load."""
    if args.reward_model is not None:
        harness.hf_dir(args.reward_model)  # the files are there; the sides check the rest
        return
    import torch

    from alignkit.checkpoint import load_pretrained, save_hf_model
    from alignkit.rewards.scoring import score_model_from_causal_lm

    torch.manual_seed(0)
    policy, tokenizer = load_pretrained(model_dir)
    target = work_root / "reward-model"
    save_hf_model(score_model_from_causal_lm(policy, head_init="normal"), target, tokenizer=tokenizer)
    args.reward_model = str(target)


def timer(parts: list[dict[str, float]], part: Callable[..., str | None], function: Callable[..., Any]
          ) -> Callable[..., Any]:
    """`function`, timed into parts[-1][part(*args)] and counted in parts[-1][f"{part}_calls"] (a new step's dict
    when the part is "generate"; no timing when part() returns None)."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        name = part(*args, **kwargs)
        if name is None:
            return function(*args, **kwargs)
        harness.synchronize()
        start = time.perf_counter()
        out = function(*args, **kwargs)
        harness.synchronize()
        if name == "generate":
            parts.append(dict.fromkeys([*PARTS, *(f"{p}_calls" for p in PARTS)], 0.0))
        parts[-1][name] += time.perf_counter() - start
        parts[-1][f"{name}_calls"] += 1
        return out

    return timed


def throughput(step_times: list[float], splits: list[dict[str, float]], tokens: list[int], scores: list[float],
               episodes: int, warmup: int) -> dict[str, Any]:
    """Episodes and generated tokens per second over the timed steps, and the mean split of a timed step."""
    seconds, steps = timed_span(step_times, warmup)
    timed = splits[warmup:]
    split = {f"{key}_s": sum(s.get(key, 0.0) for s in timed) / steps for key in (*PARTS, "rollout", "optimization")}
    generated = sum(tokens[warmup:])
    return {
        "seconds": seconds,
        "timed_steps": steps,
        "episodes_per_s": episodes * steps / seconds,
        "tokens_per_s": generated / seconds,
        "step_s": seconds / steps,
        **split,
        "other_s": seconds / steps - split["rollout_s"] - split["optimization_s"],
        "tokens_per_step": generated / steps,
        "mean_length": generated / (episodes * steps),
        "mean_score": sum(scores) / len(scores),  # over every step: both sides score with the same model
        "calls_per_step": {part: splits[-1].get(f"{part}_calls", 0) for part in PARTS},
    }


def threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------- alignkit side


def alignkit_base(args: argparse.Namespace) -> dict[str, Any]:
    """What alignkit's PPO and GRPO sides share: model, data, optimizer, sampling, train section."""
    return {
        "model": {"path": args.model_dir, "gradient_checkpointing": harness.alignkit_checkpointing(args)},
        "data": {"train": args.data},
        "optim": {"lr": LR, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant", "max_grad_norm": None},
        "train": {"batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size, "max_steps": args.steps,
                  "precision": args.precision, "log_every": 1, "report_to": [], "output_dir": args.work_dir,
                  "save_every": 0, "device": args.device},
    }


def rollout_settings(args: argparse.Namespace, generations: int) -> dict[str, Any]:
    return {"num_generations": generations, "max_prompt_length": args.max_length,
            "max_completion_length": args.max_new_tokens, "temperature": args.temperature, "top_p": 1.0, "top_k": 0,
            "stop_token": "eos"}


def run_alignkit(args: argparse.Namespace) -> dict[str, Any]:
    from alignkit.config import config_from_dict
    from alignkit.engine import Engine
    from alignkit.rollout import completion_values
    from alignkit.trainers import ppo as ppo_trainer
    from alignkit.trainers import run
    from alignkit.trainers.rl_configs import PPOConfig

    check_sizes(args)
    cfg = config_from_dict(PPOConfig, {
        **alignkit_base(args),
        "rollout": rollout_settings(args, 1),
        "ppo": {"reward_funcs": [f"rm:{args.reward_model}"], "critic_init": "reward_model", "kl_coef": KL_COEF,
                "kl_estimator": "k1", "adaptive_kl": False, "gamma": GAMMA, "lam": LAM, "cliprange": CLIPRANGE,
                "cliprange_value": CLIPRANGE_VALUE, "vf_coef": VF_COEF, "num_ppo_epochs": args.num_ppo_epochs,
                "num_mini_batches": args.num_mini_batches, "whiten_rewards": False, "reward_norm": False,
                "reward_clip": None, "missing_eos_penalty": None, "entropy_coef": 0.0, "critic_warmup_steps": 0,
                "critic_lr": None, "ptx_coef": 0.0, "old_logprobs": "auto", "kl_stop": None},
    })
    # The trainer calls these by their module names: wrap them there to time the rollout's parts.
    parts: list[dict[str, float]] = []

    def forward_part(whole: Any, forward: Any, *args: Any, **kwargs: Any) -> str:
        return "values" if getattr(forward, "func", None) is completion_values else "logps"

    ppo_trainer.generate_rollout = timer(parts, lambda *a, **k: "generate", ppo_trainer.generate_rollout)
    ppo_trainer.no_grad_forward = timer(parts, forward_part, ppo_trainer.no_grad_forward)
    ppo_trainer.score_rollout = timer(parts, lambda *a, **k: "reward", ppo_trainer.score_rollout)
    optimizer_steps = [0]  # engine.step: one optimizer step of each model it trains
    engine_step = Engine.step

    def counted_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        optimizer_steps[0] += 1
        return engine_step(self, *args, **kwargs)

    Engine.step = counted_step  # type: ignore[method-assign]
    rows = [r for r in run("ppo", cfg).metrics if r.get("step", 0) >= 1]
    if len(parts) != len(rows):
        raise SystemExit(f"alignkit sampled {len(parts)} rollouts in {len(rows)} logged iterations; expected one "
                         "each.")
    for split, row in zip(parts, rows):
        split |= {"rollout": row["time/rollout_s"], "optimization": row["time/optimization_s"]}
    stats = throughput([r["elapsed_s"] for r in rows], parts,
                       [round(r["completions/mean_length"] * args.batch_size) for r in rows],
                       [r["reward"] for r in rows], args.batch_size, args.warmup)
    precision = ("bf16 autocast in the training, log-prob and value forwards, sampling and reward model fp32; old "
                 "log-probs recomputed by a forward" if args.precision == "bf16"
                 else "fp32 throughout; old log-probs from the sampler")
    expected = args.steps * args.num_ppo_epochs * args.num_mini_batches
    if optimizer_steps[0] != expected:
        raise SystemExit(f"alignkit took {optimizer_steps[0]} optimizer steps; expected {expected} "
                         "(steps x num_ppo_epochs x num_mini_batches).")
    return {**stats, **peak_memory(args.device), "threads": threads(), "precision_note": precision,
            "optimizer_steps": optimizer_steps[0]}


def run_grpo(args: argparse.Namespace) -> dict[str, Any]:
    """alignkit GRPO at PPO's generated tokens: --batch-size completions, one optimizer step per rollout."""
    from alignkit.config import config_from_dict
    from alignkit.trainers import run
    from alignkit.trainers.rl_configs import GRPOConfig

    check_sizes(args)
    cfg = config_from_dict(GRPOConfig, {
        **alignkit_base(args),
        "rollout": rollout_settings(args, args.grpo_generations),
        "grpo": {"reward_funcs": [f"rm:{args.reward_model}"], "advantage_estimator": "grpo", "scale_rewards": "group",
                 "loss_type": "dapo", "epsilon": 0.2, "num_iterations": 1, "beta": 0.0},
    })
    rows = [r for r in run("grpo", cfg).metrics if r.get("step", 0) >= 1]
    splits = [{"rollout": r["time/rollout_s"], "optimization": r["time/optimization_s"]} for r in rows]
    stats = throughput([r["elapsed_s"] for r in rows], splits,
                       [round(r["completions/mean_length"] * args.batch_size) for r in rows],
                       [r["reward"] for r in rows], args.batch_size, args.warmup)
    return {**stats, **peak_memory(args.device), "threads": threads()}


# ---------------------------------------------------------------------------------------------- TRL side


def trl_prompts(path: str, tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """The same prompt tokens alignkit samples from: the chat template with the generation prompt; prompts longer
    than max_length tokens are left out, as alignkit's rollout.max_prompt_length does."""
    from alignkit.data import load_records
    from alignkit.data.formats import verifiable_prompts

    rows = []
    for prompt in verifiable_prompts(load_records(path), source=path, require_answer=False):
        ids = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        if len(ids) <= max_length:
            rows.append({"input_ids": list(ids)})
    return rows


def import_trl_ppo() -> tuple[Any, Any, Any, Any]:
    """(datasets, PPOConfig, PPOTrainer, the ppo_trainer module), or a clear exit where this TRL has no PPO."""
    datasets, trl = harness.import_trl()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer
    except ImportError as e:
        raise SystemExit(
            f"TRL {trl.__version__} has no trl.experimental.ppo.PPOTrainer ({e}). Install TRL 1.12 in its own "
            "virtual environment (see this script's docstring) and pass its interpreter with --trl-python, or run "
            "the alignkit sides alone with --sides alignkit,grpo."
        ) from e
    return datasets, PPOConfig, PPOTrainer, ppo_trainer


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    check_sizes(args)
    # TRL 1.12's PPOTrainer builds its own Accelerator, which reads the precision and the device from the
    # environment (transformers 5 no longer sets them from the TrainingArguments): set them before it exists.
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if args.precision == "bf16" else "no"
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    import torch
    import transformers

    datasets, PPOConfig, PPOTrainer, module = import_trl_ppo()
    b, m = args.batch_size, args.micro_batch_size
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:  # TRL's PPO masks every pad id: the prompts' EOS too
        if tokenizer.unk_token_id is None or tokenizer.unk_token_id == tokenizer.eos_token_id:
            raise SystemExit("The tokenizer's pad token is its EOS and it has no other token to pad with; TRL's PPO "
                             "needs a separate pad token.")
        tokenizer.pad_token = tokenizer.unk_token
    dataset = datasets.Dataset.from_list(trl_prompts(args.data, tokenizer, args.max_length))
    if len(dataset) < b:  # TRL's dataloader drops the last partial batch: it would have none, and wait forever
        raise SystemExit(f"{len(dataset)} prompts fit --max-length {args.max_length}, fewer than one step's {b}; "
                         "raise --records or --max-length.")
    policy = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    value_model = transformers.AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1,
                                                                                  dtype=torch.float32)
    reward_model = transformers.AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1,
                                                                                   dtype=torch.float32)
    if harness.other_checkpointing(args, default=False):  # PPOTrainer never turns it on itself (its train() bypasses Trainer's)
        policy.gradient_checkpointing_enable()
        value_model.gradient_checkpointing_enable()
    config = PPOConfig(
        output_dir=args.work_dir, per_device_train_batch_size=m, gradient_accumulation_steps=b // m,
        num_mini_batches=args.num_mini_batches, num_ppo_epochs=args.num_ppo_epochs, total_episodes=args.steps * b,
        local_rollout_forward_batch_size=b, response_length=args.max_new_tokens, stop_token="eos",
        temperature=args.temperature, missing_eos_penalty=None, kl_coef=KL_COEF, kl_estimator="k1",
        cliprange=CLIPRANGE, cliprange_value=CLIPRANGE_VALUE, vf_coef=VF_COEF, gamma=GAMMA, lam=LAM,
        whiten_rewards=False, learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", num_sample_generations=0, logging_steps=1, save_strategy="no", report_to=[],
        bf16=args.precision == "bf16", use_cpu=args.device == "cpu",
        gradient_checkpointing=harness.other_checkpointing(args, default=False), dataloader_num_workers=0, seed=0,
        sft_model_path=args.model_dir, reward_model_path=args.reward_model,
    )
    times: list[float] = []
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         eval_dataset=dataset, callbacks=[trl_step_timer(times)])
    expected_precision = "bf16" if args.precision == "bf16" else "no"
    if str(trainer.accelerator.mixed_precision) != expected_precision:
        raise SystemExit(f"TRL's accelerator runs mixed precision {trainer.accelerator.mixed_precision!r}, not "
                         f"{expected_precision!r}; the sides would not train in the same precision.")
    # One optimizer step per minibatch: accumulate exactly one minibatch's micro-batches (see the docstring).
    trainer.accelerator.gradient_accumulation_steps = b // (args.num_mini_batches * m)
    trainer.accelerator.gradient_state.plugin_kwargs["sync_with_dataloader"] = False
    optimizer_steps = [0]  # the torch optimizer's own steps (accelerate skips them while accumulating)

    def count_step(*_: Any) -> None:
        optimizer_steps[0] += 1

    trainer.optimizer.optimizer.register_step_post_hook(count_step)

    # Time the rollout's parts by wrapping the functions TRL's loop calls by their module names.
    parts: list[dict[str, float]] = []
    optim_start: list[float] = []
    tokens: list[int] = []
    pad = tokenizer.pad_token_id
    autocast_frozen: set[bool] = set()
    device_type = "cuda" if args.device == "cuda" else "cpu"

    def forward_part(model: Any, *rest: Any, **kwargs: Any) -> str | None:
        if torch.is_grad_enabled():  # a training forward: the optimisation starts with the step's first one
            if len(optim_start) < len(parts):
                harness.synchronize()
                optim_start.append(time.perf_counter())
            return None
        autocast_frozen.add(torch.is_autocast_enabled(device_type))
        return "logps"  # the reference's forward

    def reward_part(model: Any, query_responses: Any, pad_token_id: int, context_length: int) -> str:
        autocast_frozen.add(torch.is_autocast_enabled(device_type))
        if model is trainer.reward_model:  # the truncated responses: count their tokens (EOS included)
            tokens.append(int((query_responses[:, context_length:] != pad).sum()))
            return "reward"
        return "values"

    module.batch_generation = timer(parts, lambda *a, **k: "generate", module.batch_generation)
    module.forward = timer(parts, forward_part, module.forward)
    module.get_reward = timer(parts, reward_part, module.get_reward)
    started = time.perf_counter()
    trainer.train()
    if not len(parts) == len(optim_start) == len(times) == len(tokens):
        raise SystemExit(f"TRL ran {len(parts)} rollouts, {len(optim_start)} optimisations and {len(times)} steps; "
                         "expected one each per step.")
    expected = args.steps * args.num_ppo_epochs * args.num_mini_batches
    if optimizer_steps[0] != expected:
        raise SystemExit(f"TRL took {optimizer_steps[0]} optimizer steps; expected {expected} "
                         "(steps x num_ppo_epochs x num_mini_batches).")
    for split, begin, opt, end in zip(parts, [started, *times[:-1]], optim_start, times):
        split |= {"rollout": opt - begin, "optimization": end - opt}
    scores = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
    stats = throughput(times, parts, tokens, scores, b, args.warmup)
    frozen = "autocast" if autocast_frozen == {True} else "fp32" if autocast_frozen == {False} else "mixed"
    precision = (f"bf16 autocast (accelerate) in the training forward only, generation and no-grad forwards {frozen}"
                 if args.precision == "bf16" else f"fp32 (accelerate mixed precision no), no-grad forwards {frozen}")
    precision += "; old log-probs from the sampler"
    return {**stats, **peak_memory(args.device), "threads": threads(), "precision_note": precision,
            "optimizer_steps": optimizer_steps[0]}


# ---------------------------------------------------------------------------------------------- driver


def print_results(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    device = args.device
    print(f"\nPPO SmolLM2-135M-Instruct, policy + critic fully fine-tuned, {device}, GSM8K prompts, reward model "
          f"{'--reward-model' if args.reward_model_given else 'with a seeded random head'}, {args.batch_size} "
          f"episodes per step, <= {args.max_new_tokens} new tokens, temperature {args.temperature}, "
          f"PPO epochs {args.num_ppo_epochs} x minibatches {args.num_mini_batches}, micro-batch "
          f"{args.micro_batch_size}, {args.precision}, checkpointing {args.checkpointing}, AdamW lr {LR:g}, "
          f"{args.steps} steps ({args.warmup} untimed)")
    print(f"{'':10s} {'episodes/s':>10s} {'tok/s':>7s} {'step s':>7s} {'rollout s':>10s} {'(sample':>8s} "
          f"{'logps':>6s} {'values':>6s} {'reward)':>7s} {'optim s':>8s} {'other s':>8s} {'mean len':>9s} "
          f"{'score':>7s} {memory_header(device)}")
    ppo = {side: r for side, r in results.items() if side != "grpo"}
    for side, r in ppo.items():
        print(f"{side:10s} {r['episodes_per_s']:10.3f} {r['tokens_per_s']:7.2f} {r['step_s']:7.2f} "
              f"{r['rollout_s']:10.2f} {r['generate_s']:8.2f} {r['logps_s']:6.2f} {r['values_s']:6.2f} "
              f"{r['reward_s']:7.2f} {r['optimization_s']:8.2f} {r['other_s']:8.2f} {r['mean_length']:9.1f} "
              f"{r['mean_score']:7.3f} {memory_cells(r, device)}")
    if "alignkit" in results and "trl" in results:
        a, t = results["alignkit"], results["trl"]

        def ratio(key: str) -> str:
            return f"{a[key] / t[key]:.2f}x" if t[key] > 0 else "-"

        print(f"ratio alignkit/TRL: episodes/s {ratio('episodes_per_s')} (target >= 3x), tokens/s "
              f"{ratio('tokens_per_s')}; time per step: rollout {ratio('rollout_s')} (sampling "
              f"{ratio('generate_s')}, log-prob forwards {ratio('logps_s')}, value forwards {ratio('values_s')}, "
              f"reward {ratio('reward_s')}), optimisation {ratio('optimization_s')}; "
              f"{memory_ratios(a, t, device)} (target <= 1.00x)")
    for side, r in ppo.items():
        calls = ", ".join(f"{part} {count:g}" for part, count in r["calls_per_step"].items())
        print(f"{side}: {r['precision_note']}; calls per step: {calls}; {r['optimizer_steps']} optimizer steps in "
              f"all; torch threads {r['threads']}")
    print("rollout: the step up to its first training forward; in brackets, its timed parts: sample (generation), "
          "logps (no-grad log-prob forwards: the reference, plus the old policy in alignkit bf16), values (the "
          "critic's old values), reward (the reward model; alignkit's re-renders the text and scores it); the rest "
          "of the rollout is KL, GAE, whitening and data (TRL: also its gc.collect and empty_cache calls).")
    print("optim: the PPO epochs (TRL: from its first training forward to the end of the step, its metrics "
          "included); other: the rest of the step (alignkit's metrics and logging). mean len: generated tokens per "
          "episode, EOS included; the sides sample different completions, so compare tokens/s too. score: the "
          "reward model's mean; alignkit reads it after the chat template's end-of-turn tokens, TRL at the last "
          "response token, so the two differ for the same text.")
    if "grpo" in results and "alignkit" in results:
        a, g = results["alignkit"], results["grpo"]
        ppo_per_k, grpo_per_k = (1000 * r["step_s"] / r["tokens_per_step"] for r in (a, g))
        print(f"\nPPO vs GRPO step, alignkit, {args.batch_size} completions of <= {args.max_new_tokens} tokens each "
              f"(GRPO: {args.batch_size // args.grpo_generations} prompts x {args.grpo_generations}, beta 0, one "
              f"optimizer step of the policy; PPO: {args.num_ppo_epochs * args.num_mini_batches} optimizer steps of "
              "policy and critic, reference, value and reward forwards)")
        print(f"{'':10s} {'step s':>7s} {'rollout s':>10s} {'optim s':>8s} {'tokens/step':>12s} "
              f"{'s per 1k tok':>13s} {memory_header(device)}")
        for side, r, per_k in (("ppo", a, ppo_per_k), ("grpo", g, grpo_per_k)):
            print(f"{side:10s} {r['step_s']:7.2f} {r['rollout_s']:10.2f} {r['optimization_s']:8.2f} "
                  f"{r['tokens_per_step']:12.1f} {per_k:13.2f} {memory_cells(r, device)}")
        print(f"a PPO step costs {ppo_per_k / grpo_per_k:.2f}x a GRPO step at equal generated tokens "
              f"(step time per generated token; {a['step_s'] / g['step_s']:.2f}x per step).")


def main() -> None:
    ran = harness.main(__file__, __doc__ or "", {"alignkit": run_alignkit, "trl": run_trl, "grpo": run_grpo},
                       source=shared_data() / "gsm8k" / "train.jsonl", write_data=write_first_jsonl_records,
                       defaults={"steps": 3, "warmup": 1, "batch_size": 8, "records": 8}, quick_records=4,
                       records_help="first N GSM8K questions (default 8: one step's prompts at the default "
                                    "--batch-size, so every step has the same prompts)",
                       options=OPTIONS, prepare=prepare,
                       quick={"steps": 3, "batch_size": 4, "max_new_tokens": 8, "micro_batch_size": 1,
                              "num_ppo_epochs": 1, "num_mini_batches": 2, "grpo_generations": 2},
                       helps={"quick": "3 steps (1 untimed) of 4 prompts, 8 new tokens, 1 PPO epoch x 2 minibatches "
                                       "of micro-batches of 1: a smoke run",
                              "batch_size": "prompts (= episodes) per PPO step; also the GRPO step's completions",
                              "max_length": "prompts longer than this many tokens (chat template included) are left "
                                            "out, on every side"})
    if ran is None:
        return
    args, results = ran
    print_results(args, results)
    harness.exit_status(args)


def prepare(args: argparse.Namespace, model_dir: Path, work_root: Path) -> None:
    check_sizes(args)
    args.reward_model_given = args.reward_model is not None
    make_reward_model(args, model_dir, work_root)


if __name__ == "__main__":
    main()
