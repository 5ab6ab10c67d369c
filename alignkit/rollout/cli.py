"""`alignkit sample`: n answers per prompt, scored by reward functions, the best kept as SFT records (rejection
sampling's data step; `alignkit train rs` runs rounds of it with SFT in between)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from alignkit.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

EXAMPLES = """examples:
  alignkit sample --model runs/sft/final --prompts problems.jsonl --n 8 --reward accuracy --keep best \\
      --threshold 1 --output runs/samples
  alignkit sample --model smollm2-135m-instruct --prompts prompts.jsonl --n 4 --reward rm:runs/rm/final \\
      --keep top-k --k 2 --output runs/rs_data

--prompts records (JSONL): {"question": "...", "answer": "..."}; every other field reaches the reward functions.
Writes OUTPUT/samples.jsonl (every sample and its scores), OUTPUT/kept.jsonl (the kept ones as {messages} records
for `alignkit train sft`) and OUTPUT/summary.json (mean reward, pass rate = share of prompts with a kept sample).
"""


def add_reward_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """--reward (repeatable) and --reward-weights, shared by `sample` and `generate --best-of`."""
    parser.add_argument("--reward", action="append", required=required, metavar="SPEC",
                        help="a reward: accuracy, format, arithmetic, rm:PATH (a trained reward model), "
                        "module:function or file.py:function; repeat to combine")
    parser.add_argument("--reward-weights", type=float, nargs="+", metavar="W",
                        help="one weight per --reward (default 1 each)")


def rewards_from_args(args: argparse.Namespace, device: str) -> tuple[list[Any], list[float]]:
    from alignkit.rewards import verifiable

    return verifiable.load_rewards(list(args.reward or []), args.reward_weights, device=device)


def add_sample_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sample", help="sample n answers per prompt, score them and keep the best (rejection sampling data)",
        description="Best-of-n sampling: every prompt gets n answers, each scored by the reward functions; the kept "
        "ones become SFT records.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="HF directory, .gguf, alignkit run, or smollm2-135m-instruct")
    parser.add_argument("--prompts", required=True, help="JSONL of {question, answer, ...} records")
    parser.add_argument("--output", required=True, help="directory for samples.jsonl, kept.jsonl, summary.json")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    add_reward_arguments(parser, required=True)
    parser.add_argument("--keep", choices=["best", "top-k", "threshold"], default="best",
                        help="best: the top sample; top-k: the k best distinct; threshold: every distinct sample "
                        "with reward >= --threshold (default best)")
    parser.add_argument("--k", type=int, default=1, help="samples kept per prompt with --keep top-k")
    parser.add_argument("--threshold", type=float, default=None,
                        help="minimum reward of a kept sample (with a 0/1 checker, 1 keeps correct answers only)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-prompt-length", type=int, default=1024, help="longer prompts are skipped and counted")
    parser.add_argument("--system", help="system message for every prompt ('r1': DeepSeek-R1-Zero's)")
    parser.add_argument("--question-field", default="question", help="the record field holding the prompt")
    parser.add_argument("--limit", type=int, default=None, help="use only the first LIMIT records")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32 or bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.set_defaults(func=run_sample)


def check_sampling(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise ConfigError(f"--n must be at least 1; got {args.n}.")
    if args.keep == "threshold" and args.threshold is None:
        raise ConfigError("--keep threshold needs --threshold (the lowest reward a kept sample may have).")
    if args.keep == "top-k" and args.k < 1:
        raise ConfigError(f"--k must be at least 1; got {args.k}.")
    if not args.temperature > 0 and args.n > 1:
        raise ConfigError("--n > 1 samples need --temperature > 0 (greedy decoding gives the same answer n times).")


def write_atomic(path: Path, text: str) -> None:
    """Write `path` via a temporary file and a rename: a crash leaves the old file or the new, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def run_sample(args: argparse.Namespace) -> int:
    import torch

    import alignkit
    from alignkit.data import load_records
    from alignkit.generation import SamplingParams
    from alignkit.model import DTYPES
    from alignkit.rollout.best_of import sample_and_select, sample_records, sample_summary, sft_records
    from alignkit.rollout.prompts import load_prompts

    check_sampling(args)
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype {args.dtype!r}: choose one of {', '.join(sorted(DTYPES))}.")
    output = Path(args.output)
    if (output / "samples.jsonl").exists():
        raise ConfigError(f"{output} already holds samples.jsonl; choose a new --output (nothing was overwritten).")
    functions, weights = rewards_from_args(args, args.device)  # a bad reward spec fails before the model loads
    model, tokenizer = alignkit.load(args.model, dtype=DTYPES[args.dtype], device=args.device)
    if tokenizer is None:
        raise CheckpointError(f"{args.model}: the checkpoint has no tokenizer (tokenizer.json); sampling needs one.")
    records = load_records(args.prompts)[: args.limit]
    needs_answer = any(spec in ("accuracy", "arithmetic") for spec in args.reward)
    items = load_prompts(records, tokenizer, source=args.prompts, max_prompt_length=args.max_prompt_length,
                         system_prompt=args.system, question_field=args.question_field, require_answer=needs_answer)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    samples = sample_and_select(model, tokenizer, items, params, n=args.n, functions=functions, weights=weights,
                                keep=args.keep, k=args.k, threshold=args.threshold, batch_size=args.batch_size)
    summary = sample_summary(samples) | {"seconds": time.perf_counter() - started}
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / "kept.jsonl", jsonl(sft_records(items, samples)))
    write_atomic(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(output / "samples.jsonl", jsonl(sample_records(items, samples)))  # last: it marks a finished run
    logger.info(f"{summary['prompts']} prompts x {args.n} samples in {summary['seconds']:.1f}s: mean reward "
                f"{summary['reward']:.4f}, pass rate {summary['pass_rate']:.4f}, kept {summary['kept']}; wrote "
                f"{output}/samples.jsonl, kept.jsonl, summary.json")
    return 0
