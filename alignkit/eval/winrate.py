"""Win rate: two models answer the same prompts and a reward model judges every answer (`alignkit winrate`).

```python
prompts = read_prompts("prompts.jsonl")                        # [[{"role": "user", "content": ...}], ...]
prompts, dropped = exclude_prompts(prompts, ["judge_train.jsonl"])
answers_a = generate_answers(model_a, tokenizer_a, prompts, SamplingParams(max_new_tokens=128, temperature=0))
answers_b = generate_answers(model_b, tokenizer_b, prompts, SamplingParams(max_new_tokens=128, temperature=0))
scores_a, scores_b = judge_answers(reward_model_function("runs/rm_judge"), prompts, answers_a, answers_b)
summary = win_rate_summary(scores_a, scores_b, answers_a, answers_b)
```

How a prompt is judged: each model answers through its own chat template; the judge scores the conversation
(prompt + answer) with *its* tokenizer and chat template (`alignkit.rewards.scoring.reward_model_function`, the
`rm:PATH` reward), so models and judge may use different tokenizers. The model wins a prompt when its score is
higher than the baseline's, loses when lower, and a tie (equal scores: identical answers always tie, because each
distinct conversation is scored once) counts half. The win rate is the mean of these outcomes (1, 0.5, 0) over the
prompts, and its standard error is that of the mean (sample standard deviation / sqrt(n)): without ties, the
binomial sqrt(p (1 - p) / (n - 1)).

Length next to the win rate: a judge that prefers longer answers lets a policy win by talking more (the classic
sign of reward hacking), so the summary gives each model's mean answer length in tokens (its own tokenizer, the
stop token not counted) and characters, the share of answers cut at max_new_tokens, the win rate among the prompts
where the model's answer is longer (in characters) than the baseline's and among those where it is shorter, and the
correlation between the judge's score and the answer's length over all answers.

Prompts that the judge was trained on are dropped before anything is generated (`--exclude`): a prompt is left out
when its normalised text (every message's role and content, whitespace collapsed, case folded) equals that of a
prompt in the excluded files; the summary says how many.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alignkit.data.formats import preference_to_pair, validate_messages
from alignkit.data.readers import load_records
from alignkit.errors import CheckpointError, ConfigError, DataError
from alignkit.eval.metrics import mean_stderr
from alignkit.generation import SamplingParams, generate
from alignkit.generation.packed import packed_linears

if TYPE_CHECKING:
    from alignkit.model import LlamaForCausalLM
    from alignkit.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Message = dict[str, str]
# (prompts, completions) -> one score per completion: a reward model loaded by `reward_model_function`.
JudgeFn = Callable[..., Sequence[float | None]]


# ---------------------------------------------------------------------------------------------- prompts


def record_prompt(record: dict[str, Any], *, index: int, source: str) -> list[Message]:
    """The prompt of one record as chat messages (ending with a user turn).

    Accepted: a preference record ({chosen, rejected} HH-RLHF transcripts or message lists, or {prompt, chosen,
    rejected}): its shared prompt; {messages}: the conversation without its final assistant turn; {prompt}: a user
    message (a string) or a message list; {question}: a user message.
    """
    where = f"record {index} of {source}"
    if "chosen" in record and "rejected" in record:
        pair = preference_to_pair(record, index=index, source=source)
        if isinstance(pair, str):
            raise DataError(f"{where}: a preference record whose prompt cannot be read ({pair}).")
        messages = pair.prompt
    elif "messages" in record:
        messages = validate_messages(record["messages"], index=index, source=source)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    elif "prompt" in record or "question" in record:
        key = "prompt" if "prompt" in record else "question"
        value = record[key]
        if isinstance(value, str):
            if not value.strip():
                raise DataError(f"{where}: {key!r} is empty.")
            messages = [{"role": "user", "content": value}]
        elif key == "prompt":
            messages = validate_messages(value, index=index, source=source, key="prompt")
        else:
            raise DataError(f"{where}: 'question' must be a string, got {type(value).__name__}.")
    else:
        raise DataError(f"{where} has no prompt: it has {sorted(record)}; expected 'prompt', 'question', "
                        "'messages', or a preference record with 'chosen' and 'rejected'.")
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user message for the models to answer; it ends with "
                        f"{messages[-1]['role'] if messages else 'nothing'}.")
    return messages


def read_prompts(path: str | Path) -> list[list[Message]]:
    """Every record's prompt (`record_prompt`) from a file or folder that `load_records` reads."""
    records = load_records(path)
    if not records:
        raise DataError(f"{path} has no records.")
    return [record_prompt(r, index=i, source=str(path)) for i, r in enumerate(records)]


def normalise_prompt(messages: Sequence[Message]) -> str:
    """The text two prompts are compared by: each message's role and content, whitespace collapsed, case folded."""
    return "\n".join(f"{m['role']}: {' '.join(m['content'].split()).casefold()}" for m in messages)


def exclude_prompts(prompts: list[list[Message]], exclude: Sequence[str | Path]
                    ) -> tuple[list[int], int]:
    """(indices of the prompts kept, how many were dropped): a prompt is dropped when its normalised text is that
    of a prompt in any of the `exclude` files (preference records, or any record `record_prompt` reads)."""
    excluded: set[str] = set()
    for path in exclude:
        excluded |= {normalise_prompt(p) for p in read_prompts(path)}
    kept = [i for i, p in enumerate(prompts) if normalise_prompt(p) not in excluded]
    return kept, len(prompts) - len(kept)


# ---------------------------------------------------------------------------------------------- answers


@dataclass
class Answer:
    """One model's answer to one prompt."""

    text: str
    # Generated tokens under the model's own tokenizer, the stop token not counted.
    num_tokens: int
    # "stop" (the model ended its turn) or "length" (cut at max_new_tokens).
    finish_reason: str


def prompt_ids(tokenizer: Tokenizer, prompts: Sequence[Sequence[Message]]) -> list[list[int]]:
    """Each prompt through the model's chat template, ending with the assistant's generation prompt."""
    return [list(tokenizer.apply_chat_template(list(p), add_generation_prompt=True).input_ids) for p in prompts]


def generate_answers(model: LlamaForCausalLM, tokenizer: Tokenizer, prompts: Sequence[Sequence[Message]],
                     params: SamplingParams, *, batch_size: int = 8) -> list[Answer]:
    """One answer per prompt, in prompt order. Prompts are batched longest first (less padding); with sampling,
    batch k uses seed params.seed + k, so a run is repeatable."""
    if params.n != 1:
        raise ValueError("generate_answers draws one answer per prompt; use SamplingParams(n=1).")
    ids = prompt_ids(tokenizer, prompts)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    answers: list[Answer | None] = [None] * len(ids)
    with packed_linears(model, batch_size=batch_size):  # pack the weights once for every batch
        for k, start in enumerate(range(0, len(order), batch_size)):
            chunk = order[start : start + batch_size]
            seed = None if params.seed is None else params.seed + k
            completions = generate(model, [ids[i] for i in chunk], replace(params, seed=seed), tokenizer=tokenizer)
            for i, completion in zip(chunk, completions):
                text = (completion.text or "").strip()
                # A "stop" finish keeps its stop token in token_ids (generation's convention); not answer text.
                stop = int(completion.finish_reason == "stop" and not params.stop_strings)
                answers[i] = Answer(text, len(completion.token_ids) - stop, completion.finish_reason)
    return [a for a in answers if a is not None]


def judge_answers(judge: JudgeFn, prompts: Sequence[Sequence[Message]], answers_a: Sequence[Answer],
                  answers_b: Sequence[Answer]) -> tuple[list[float], list[float]]:
    """(the judge's score of each model answer, of each baseline answer). Each distinct (prompt, answer)
    conversation is scored once, so identical answers get identical scores whatever the judge's batching."""
    keys: dict[tuple[str, str], int] = {}
    unique_prompts: list[list[Message]] = []
    unique_texts: list[str] = []
    for prompt, answer in [*zip(prompts, answers_a), *zip(prompts, answers_b)]:
        key = (json.dumps(list(prompt), ensure_ascii=False), answer.text)
        if key not in keys:
            keys[key] = len(unique_texts)
            unique_prompts.append(list(prompt))
            unique_texts.append(answer.text)
    scores = list(judge(unique_prompts, unique_texts))
    if len(scores) != len(unique_texts) or any(s is None or not math.isfinite(s) for s in scores):
        raise DataError("the judge returned a missing or non-finite score; check the reward model.")

    def lookup(prompt: Sequence[Message], answer: Answer) -> float:
        return float(scores[keys[(json.dumps(list(prompt), ensure_ascii=False), answer.text)]] or 0.0)

    return ([lookup(p, a) for p, a in zip(prompts, answers_a)], [lookup(p, a) for p, a in zip(prompts, answers_b)])


# ---------------------------------------------------------------------------------------------- statistics


def outcome(score_a: float, score_b: float) -> float:
    """1 when the model (a) wins the prompt, 0 when the baseline (b) does, 0.5 for a tie."""
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5


def _rate(outcomes: Sequence[float]) -> dict[str, float | int | None]:
    rate, stderr = mean_stderr(outcomes)
    return {"win_rate": _finite(rate), "stderr": _finite(stderr), "n": len(outcomes)}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's correlation of two equally long lists; None when either is constant or shorter than 2."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def length_stats(answers: Sequence[Answer], scores: Sequence[float]) -> dict[str, float]:
    """One model's mean score, mean answer length in tokens and characters, and share cut at max_new_tokens."""
    n = max(1, len(answers))
    return {"mean_score": sum(scores) / n, "mean_tokens": sum(a.num_tokens for a in answers) / n,
            "mean_chars": sum(len(a.text) for a in answers) / n,
            "truncated": sum(a.finish_reason == "length" for a in answers) / n}


def win_rate_summary(scores_a: Sequence[float], scores_b: Sequence[float], answers_a: Sequence[Answer],
                     answers_b: Sequence[Answer]) -> dict[str, Any]:
    """Win rate of the model (a) over the baseline (b) with its standard error, wins / ties / losses, each side's
    score and length statistics, the win rate split by which answer is longer (characters), and the correlation
    of the judge's score with the answer's length in characters over both sides' answers."""
    outcomes = [outcome(a, b) for a, b in zip(scores_a, scores_b)]
    longer = [o for o, a, b in zip(outcomes, answers_a, answers_b) if len(a.text) > len(b.text)]
    shorter = [o for o, a, b in zip(outcomes, answers_a, answers_b) if len(a.text) < len(b.text)]
    lengths = [float(len(a.text)) for a in [*answers_a, *answers_b]]
    return {
        **_rate(outcomes),
        "wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0),
        "model": length_stats(answers_a, scores_a), "baseline": length_stats(answers_b, scores_b),
        "model_longer": _rate(longer), "model_shorter": _rate(shorter),
        "same_length": len(outcomes) - len(longer) - len(shorter),
        "score_length_correlation": pearson([*scores_a, *scores_b], lengths),
    }


# ---------------------------------------------------------------------------------------------- outputs


def sample_records(indices: Sequence[int], prompts: Sequence[Sequence[Message]], answers_a: Sequence[Answer],
                   answers_b: Sequence[Answer], scores_a: Sequence[float], scores_b: Sequence[float]
                   ) -> list[dict[str, Any]]:
    """One record per prompt for samples.jsonl: its index in the prompt file, the prompt, both answers, both
    scores, lengths and finish reasons, and the winner ("model", "baseline" or "tie")."""
    winner = {1.0: "model", 0.0: "baseline", 0.5: "tie"}
    return [{"index": i, "prompt": list(p), "model_answer": a.text, "baseline_answer": b.text,
             "model_score": sa, "baseline_score": sb, "winner": winner[outcome(sa, sb)],
             "model_tokens": a.num_tokens, "baseline_tokens": b.num_tokens,
             "model_finish": a.finish_reason, "baseline_finish": b.finish_reason}
            for i, p, a, b, sa, sb in zip(indices, prompts, answers_a, answers_b, scores_a, scores_b)]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _rate_text(r: dict[str, Any]) -> str:
    n = r["n"]
    return "n/a (0 prompts)" if not n else f"{_fmt(r['win_rate'])} ± {_fmt(r['stderr'])} ({n} prompt{'s' * (n != 1)})"


def markdown_summary(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The summary as markdown: the win rate, then one row per side with score and lengths."""
    m, b = summary["model"], summary["baseline"]
    lines = [
        f"# Win rate: {meta['model']} vs {meta['baseline']}", "",
        f"Judge: {meta['judge']}. Prompts: {meta['prompts']} ({meta['num_prompts']} judged; "
        f"{meta['excluded']} dropped as in the judge's training data, {meta['too_long']} longer than "
        f"{meta['max_prompt_length']} tokens). Decoding: temperature {meta['temperature']}, at most "
        f"{meta['max_new_tokens']} new tokens.", "",
        f"**Win rate of the model: {_rate_text(summary)}**; {summary['wins']} wins, {summary['ties']} ties, "
        f"{summary['losses']} losses (a tie counts half).", "",
        "| side | mean score | mean tokens | mean characters | cut at max tokens |",
        "|---|---|---|---|---|",
        f"| model | {m['mean_score']:.4f} | {m['mean_tokens']:.1f} | {m['mean_chars']:.1f} | {m['truncated']:.1%} |",
        f"| baseline | {b['mean_score']:.4f} | {b['mean_tokens']:.1f} | {b['mean_chars']:.1f} | "
        f"{b['truncated']:.1%} |", "",
        f"Win rate where the model's answer is longer: {_rate_text(summary['model_longer'])}; where it is shorter: "
        f"{_rate_text(summary['model_shorter'])}; same length: {summary['same_length']}. Correlation of the judge's "
        f"score with answer length (characters, both sides): {_fmt(summary['score_length_correlation'])}. A model "
        "that wins mostly when it is longer, under a judge whose score follows length, is likely gaming length.",
    ]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str | Path, summary: dict[str, Any], samples: Sequence[dict[str, Any]],
                  meta: dict[str, Any]) -> dict[str, Path]:
    """results.json (the run's settings and counts, with the summary under "results"), samples.jsonl and results.md in
    `out_dir`; returns what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {name: out / name for name in ("results.json", "samples.jsonl", "results.md")}
    written["results.json"].write_text(json.dumps({**meta, "results": summary}, indent=2) + "\n")
    with written["samples.jsonl"].open("w") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    written["results.md"].write_text(markdown_summary(summary, meta))
    return written


def model_name(path: str) -> str:
    """A folder-safe short name of a model path: its last component (a .gguf's stem)."""
    p = Path(path.rstrip("/"))
    name = p.stem if p.suffix.lower() == ".gguf" else p.name
    if name == "final" and p.parent.name:  # an alignkit run's exported model: name it by the run
        name = p.parent.name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"


# ---------------------------------------------------------------------------------------------- the whole run


def check_judge(path: str) -> int:
    """The judge's context length (max_position_embeddings), or a one-line CheckpointError unless `path` is a reward
    model (an HF directory or run with a score head); read from its config before any answer is generated."""
    from alignkit.checkpoint import resolve_model_path
    from alignkit.checkpoint.hf import checkpoint_kind, read_hf_config

    resolved = resolve_model_path(path)
    if resolved.is_file() or checkpoint_kind(read_hf_config(resolved)[1]) != "score":
        raise CheckpointError(f"--judge {path} is a language model, not a reward model (no score head); pass a "
                              "reward model trained with `alignkit train rm` (its run directory or final/).")
    return read_hf_config(resolved)[0].max_position_embeddings


def run_win_rate(model: str, baseline: str, judge: str, prompts_path: str, *, exclude: Sequence[str] = (),
                 limit: int | None = None, params: SamplingParams, max_prompt_length: int = 512,
                 batch_size: int = 8, dtype: torch.dtype = torch.float32, device: str = "cpu"
                 ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(summary, per-prompt samples, meta) of `model` against `baseline` on the prompts of `prompts_path`, judged by
    the reward model `judge`. Every input is checked before a model is loaded. Both models are loaded to check
    the prompts' lengths under each tokenizer (a prompt longer than `max_prompt_length` tokens under either is
    dropped and counted); each answers, and is freed before the judge loads."""
    import alignkit
    from alignkit.rewards.scoring import reward_model_function

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1; got {limit}.")
    prompts = read_prompts(prompts_path)
    kept, excluded = exclude_prompts(prompts, exclude)
    if excluded:
        logger.info(f"{excluded} of {len(prompts)} prompts dropped: they are in the judge's training data "
                    f"({', '.join(map(str, exclude))}).")
    if not kept:
        raise DataError(f"no prompt of {prompts_path} is left after excluding the {excluded} that appear in "
                        f"{', '.join(map(str, exclude))}; give other prompts.")
    kept = kept[:limit] if limit is not None else kept
    judge_context = check_judge(judge)

    loaded = {}
    for name, path in (("model", model), ("baseline", baseline)):
        logger.info(f"loading {name} {path} ...")
        lm, tokenizer = alignkit.load(path, dtype=dtype, device=device)
        if tokenizer is None:
            raise CheckpointError(f"{path}: the checkpoint has no tokenizer (tokenizer.json); the win rate needs one "
                                  "to apply the chat template. Copy the base model's tokenizer files into it.")
        loaded[name] = (lm, tokenizer)
    fits = [i for i in kept
            if all(len(ids) <= max_prompt_length for _, tok in loaded.values() for ids in prompt_ids(tok, [prompts[i]]))]
    too_long = len(kept) - len(fits)
    if not fits:
        raise DataError(f"every prompt of {prompts_path} is longer than --max-prompt-length {max_prompt_length} "
                        "tokens; raise it.")
    chosen = [prompts[i] for i in fits]
    answers = {}
    for name in ("model", "baseline"):
        lm, tokenizer = loaded.pop(name)
        logger.info(f"{name}: answering {len(chosen)} prompts ...")
        answers[name] = generate_answers(lm, tokenizer, chosen, params, batch_size=batch_size)
        del lm
    logger.info(f"judging with {judge} ...")
    # A conversation longer than the judge's context loses its start (the end, where the reward is read, stays).
    judge_fn = reward_model_function(judge, device=device, dtype=dtype, batch_size=batch_size,
                                     max_length=judge_context)
    scores_a, scores_b = judge_answers(judge_fn, chosen, answers["model"], answers["baseline"])
    summary = win_rate_summary(scores_a, scores_b, answers["model"], answers["baseline"])
    samples = sample_records(fits, chosen, answers["model"], answers["baseline"], scores_a, scores_b)
    meta = {"model": model, "baseline": baseline, "judge": judge, "prompts": str(prompts_path),
            "exclude": [str(e) for e in exclude], "num_prompts_in_file": len(prompts), "excluded": excluded,
            "too_long": too_long, "num_prompts": len(fits), "limit": limit, "max_prompt_length": max_prompt_length,
            "max_new_tokens": params.max_new_tokens, "temperature": params.temperature, "seed": params.seed}
    return summary, samples, meta
