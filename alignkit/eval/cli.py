"""`alignkit eval --model M --tasks T1,T2 --shots 0,1,5`: few-shot log-likelihood evaluation; `alignkit winrate --model A
--baseline B --judge RM --prompts FILE`: A's win rate over B judged by a reward model (docs/evaluation.md)."""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path
from typing import Any

from alignkit.errors import CheckpointError, ConfigError
from alignkit.eval.harness import check_shots, evaluate_task, markdown_table, prepare, write_outputs
from alignkit.eval.tasks import FEWSHOT_DELIMITER, TARGET_DELIMITER, load_task
from alignkit.model import DTYPES

logger = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,5; got {text!r}") from None


def add_eval_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="few-shot multiple-choice and LAMBADA-style evaluation (lm-evaluation-harness metrics)",
        description="Score each task's choices by their log-likelihood after a few-shot prompt and report acc, "
        "acc_norm (or LAMBADA's acc and perplexity) with standard errors for each shot count. The table goes to "
        "stdout; results.json, results.md, samples_<task>_<k>shot.jsonl and icl.png go to --output.",
    )
    parser.add_argument("--model", required=True,
                        help="an HF model directory, a .gguf file, an alignkit run, or smollm2-135m-instruct")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated task names (files in <data>/icl_eval: arc_easy, boolq, ...) or "
                        "JSONL paths")
    parser.add_argument("--shots", type=_int_list, default=[0],
                        help="comma-separated shot counts (default 0), e.g. 0,1,5")
    parser.add_argument("--limit", type=int, default=None,
                        help="score only the first N records after the shot pool (default: all)")
    parser.add_argument("--shot-pool", type=int, default=None,
                        help="records at the head of each file kept as shots and never scored (default: the "
                        "largest shot count); fix it to compare runs with different --shots on the same records")
    parser.add_argument("--output", default=None, help="output folder (default: runs/eval/<model name>)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="items per forward (each item packs all its choices in one row; default 16)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--data-dir", default=None,
                        help="the shared data folder that holds icl_eval/ (default: $ALIGNKIT_SHARED_DATA, "
                        "else ../shared/data)")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    import alignkit

    shots = check_shots(args.shots)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1; got {args.batch_size}.")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks is empty; give task names or JSONL paths, comma-separated.")
    # Every task file is read and checked before the model loads: a bad record fails in a second, not after it.
    tasks = [load_task(name, args.data_dir) for name in names]
    for task in tasks:
        prepare(task, shots, shot_pool=args.shot_pool, limit=args.limit)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    logger.info(f"loading {args.model} ({args.dtype}, {device}) ...")
    model, tokenizer = alignkit.load(args.model, dtype=DTYPES[args.dtype], device=device)
    if tokenizer is None:
        raise CheckpointError(f"{args.model}: the checkpoint has no tokenizer (tokenizer.json); eval needs one to "
                              "encode the prompts. Copy the base model's tokenizer files into the directory.")
    logger.info(f"loaded {model.num_parameters():,} parameters in {time.perf_counter() - start:.1f}s")

    results = []
    for task in tasks:
        results += evaluate_task(model, tokenizer, task, shots, shot_pool=args.shot_pool, limit=args.limit,
                                 batch_size=args.batch_size)
    out = Path(args.output) if args.output else Path("runs") / "eval" / _model_name(args.model)
    meta = {
        "model": args.model, "dtype": args.dtype, "device": device, "shots": shots, "limit": args.limit,
        "shot_pool": args.shot_pool if args.shot_pool is not None else max(shots),
        "tasks": {t.name: {"path": str(t.path), "layout": t.layout, "num_records": len(t.docs)} for t in tasks},
        "target_delimiter": TARGET_DELIMITER, "fewshot_delimiter": FEWSHOT_DELIMITER,
        "elapsed_s": round(time.perf_counter() - start, 2),
    }
    written = write_outputs(results, out, meta=meta)
    print(markdown_table(results), end="")
    logger.info(f"wrote {', '.join(written)} to {out}")
    return 0


def _model_name(model: str) -> str:
    path = Path(model.rstrip("/"))
    name = path.stem if path.suffix.lower() == ".gguf" else path.name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"


# ---------------------------------------------------------------------------------------------- alignkit winrate


def add_winrate_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "winrate",
        help="win rate of one model's answers over another's, judged by a reward model, with length statistics",
        description="Both models answer the same prompts through their chat templates; the judge reward model "
        "scores each answer with its own tokenizer and template; the model wins a prompt when its score is higher "
        "(a tie counts half). Prints the win rate with its standard error, each side's mean score and answer "
        "length, and the win rate where the model's answer is longer vs shorter (reward hacking by length); "
        "results.json, samples.jsonl (per prompt) and results.md go to --output.",
    )
    parser.add_argument("--model", required=True,
                        help="the model judged (an HF directory, a .gguf file, an alignkit run, or "
                        "smollm2-135m-instruct)")
    parser.add_argument("--baseline", required=True, help="the model it is compared with (same forms)")
    parser.add_argument("--judge", required=True, help="a reward model: an `alignkit train rm` run or its final/")
    parser.add_argument("--prompts", required=True,
                        help="prompt records (a file or folder): {prompt}, {question}, {messages} (a final "
                        "assistant turn is dropped), or preference records, whose shared prompt is used")
    parser.add_argument("--exclude", action="append", default=[],
                        help="preference (or prompt) records the judge was trained on; prompts whose normalised "
                        "text appears there are dropped and counted (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="judge only the first N prompts left after --exclude")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per answer at most (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed when --temperature > 0 (default 0)")
    parser.add_argument("--max-prompt-length", type=int, default=512,
                        help="prompts longer than this many tokens under either model's template are dropped and "
                        "counted (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default 8)")
    parser.add_argument("--output", default=None,
                        help="output folder (default: runs/winrate/<model>_vs_<baseline>)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the models and the judge (default float32)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.set_defaults(func=run_winrate)


def run_winrate(args: argparse.Namespace) -> int:
    import torch

    from alignkit.eval.winrate import markdown_summary, model_name, run_win_rate, write_outputs
    from alignkit.generation import SamplingParams

    if args.batch_size < 1 or args.max_prompt_length < 1:
        raise ConfigError("--batch-size and --max-prompt-length must be at least 1.")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            seed=args.seed if args.temperature > 0 else None)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    summary, samples, meta = run_win_rate(
        args.model, args.baseline, args.judge, args.prompts, exclude=args.exclude, limit=args.limit, params=params,
        max_prompt_length=args.max_prompt_length, batch_size=args.batch_size, dtype=DTYPES[args.dtype],
        device=device)
    meta |= {"dtype": args.dtype, "device": device, "elapsed_s": round(time.perf_counter() - start, 2)}
    out = (Path(args.output) if args.output
           else Path("runs") / "winrate" / f"{model_name(args.model)}_vs_{model_name(args.baseline)}")
    written = write_outputs(out, summary, samples, meta)
    print(markdown_summary(summary, meta), end="")
    logger.info(f"wrote {', '.join(written)} to {out}")
    return 0
