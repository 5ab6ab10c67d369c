"""`alignkit eval --model M --tasks T1,T2 --shots 0,1,5`: few-shot log-likelihood evaluation; `alignkit winrate --model A
--baseline B --judge RM --prompts FILE`: A's win rate over B judged by a reward model (docs/evaluation.md)."""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path
from typing import Any

from alignkit.errors import ConfigError
from alignkit.eval.generative import (
    GenerationSettings,
    GenerativeTask,
    evaluate_generative_task,
    is_generative,
    load_generative_task,
)
from alignkit.eval.harness import (
    check_shots,
    evaluate_task,
    markdown_table,
    prepare,
    with_group_results,
    write_outputs,
)
from alignkit.eval.tasks import FEWSHOT_DELIMITER, TARGET_DELIMITER, Task, load_tasks
from alignkit.generation.cli import load_model
from alignkit.model import DTYPES

logger = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,5; got {text!r}") from None


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def add_eval_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="few-shot multiple-choice, LAMBADA-style and generative (answer-checked) evaluation",
        description="Score each task's choices by their log-likelihood after a few-shot prompt and report acc, "
        "acc_norm (or LAMBADA's acc and perplexity) with standard errors for each shot count. The table goes to "
        "stdout; results.json, results.md, samples_<task>_<k>shot.jsonl and icl.png go to --output.",
    )
    parser.add_argument("--model", required=True,
                        help="an HF model directory, a .gguf file, an alignkit run, or smollm2-135m-instruct")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated task names (files in <data>/icl_eval: arc_easy, boolq, ...), "
                        "JSONL paths, or MMLU from <data>/mmlu: mmlu (every subject's test split and their average), "
                        "mmlu:val (the val split), mmlu_<subject> (one subject; :val too)")
    parser.add_argument("--shots", type=_int_list, default=[0],
                        help="comma-separated shot counts (default 0), e.g. 0,1,5")
    parser.add_argument("--limit", type=int, default=None,
                        help="score only the first N records after the shot pool (default: all); MMLU: the first "
                        "N questions of each subject")
    parser.add_argument("--shot-pool", type=int, default=None,
                        help="records at the head of each file kept as shots and never scored (default: the "
                        "largest shot count); fix it to compare runs with different --shots on the same records")
    parser.add_argument("--output", default=None, help="output folder (default: runs/eval/<model name>)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="packed lines per forward (an item is one row with all its choices; short rows share a "
                        "line; default 16)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--data-dir", default=None,
                        help="the shared data folder that holds icl_eval/ and mmlu/ (default: $ALIGNKIT_SHARED_DATA, "
                        "else ../shared/data)")
    generative = parser.add_argument_group(
        "generative tasks", "tasks of {question, answer} records (gsm8k, mawps_asdiv_a, multiarith, addsub, singleeq, "
        "or a JSONL file): the model writes an answer and a checker scores it (docs/evaluation.md)")
    generative.add_argument("--prompt-format", choices=["text", "chat"], default="text",
                            help="text: 'Question: ...\\nAnswer: ...' shots and question as plain text (default); "
                            "chat: the shots as earlier turns, through the model's chat template")
    generative.add_argument("--check", default=None,
                            help="answer checker: accuracy (the final number by value), arithmetic (the quickstart's "
                            "'The answer is N') or module:function / file.py:function (a reward function scoring 1 "
                            "for a right answer); default: accuracy")
    generative.add_argument("--samples", type=int, default=1,
                            help="samples per problem (default 1: greedy acc); more need --temperature > 0")
    generative.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    generative.add_argument("--pass-k", type=_int_list, default=None,
                            help="k values of pass@k when sampling, each at most --samples (default: 1 and --samples)")
    generative.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per answer at most (default 256)")
    generative.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    generative.add_argument("--stop", action="append", type=_unescape, default=[],
                            help="a string that ends an answer, \\n and \\t read as newline and tab (repeatable; "
                            "default for text prompts: a blank line and 'Question:'; the end of text or of the "
                            "turn always stops)")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    shots = check_shots(args.shots)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1; got {args.batch_size}.")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks is empty; give task names or JSONL paths, comma-separated.")
    generation = GenerationSettings(
        prompt_format=args.prompt_format, check=args.check, samples=args.samples, temperature=args.temperature,
        pass_k=tuple(args.pass_k or ()), max_new_tokens=args.max_new_tokens, seed=args.seed,
        stop=tuple(args.stop))
    # Every task file is read and checked before the model loads: a bad record fails in a second, not after it.
    tasks: list[Any] = [task for name in names for task in (
        [load_generative_task(name, args.data_dir)] if is_generative(name) else load_tasks(name, args.data_dir))]
    named = [t.name for t in tasks]
    if len(set(named)) < len(named):
        twice = sorted({name for name in named if named.count(name) > 1})
        raise ConfigError(f"--tasks names {', '.join(twice)} more than once (mmlu includes every mmlu_<subject>); "
                          "list each task once.")
    for task in tasks:
        if isinstance(task, GenerativeTask):
            task.prepare(shots, shot_pool=args.shot_pool, limit=args.limit)
        else:
            prepare(task, shots, shot_pool=args.shot_pool, limit=args.limit)
    scored = [t.name for t in tasks if not isinstance(t, GenerativeTask)]
    if args.prompt_format == "chat" and scored:
        raise ConfigError(f"--prompt-format chat applies to generative tasks; {', '.join(scored)} are scored by "
                          "log-likelihood as plain text. Evaluate them in a separate run without it.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, args.dtype, device=device,
                                  purpose="eval needs one to encode the prompts")

    results = []
    for task in tasks:
        if isinstance(task, GenerativeTask):
            results += evaluate_generative_task(model, tokenizer, task, shots, generation, shot_pool=args.shot_pool,
                                                limit=args.limit, batch_size=args.batch_size)
            continue
        results += evaluate_task(model, tokenizer, task, shots, shot_pool=args.shot_pool, limit=args.limit,
                                 batch_size=args.batch_size)
    results = with_group_results(results)  # MMLU's average over its subjects
    out = Path(args.output) if args.output else Path("runs") / "eval" / _model_name(args.model)
    meta = {
        "model": args.model, "dtype": args.dtype, "device": device, "shots": shots, "limit": args.limit,
        "shot_pool": args.shot_pool if args.shot_pool is not None else max(shots),
        "tasks": {t.name: {"path": str(t.path), "layout": t.layout, "num_records": len(t.docs)} for t in tasks},
        "target_delimiter": TARGET_DELIMITER, "fewshot_delimiter": FEWSHOT_DELIMITER,
        "elapsed_s": round(time.perf_counter() - start, 2),
    }
    meta["tasks"].update({t.name: t.describe() for t in tasks if isinstance(t, Task)})  # MMLU: dev file, group
    if len(scored) < len(tasks):
        meta["generation"] = generation.describe({t.name: t.check for t in tasks if isinstance(t, GenerativeTask)})
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
