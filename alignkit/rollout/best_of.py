"""Best-of-n: sample n answers per prompt, score them, keep the best. Rejection sampling (`alignkit sample`,
`alignkit train rs`) and `alignkit generate --best-of` are this module plus a file writer or an SFT round.

    samples = sample_and_select(model, tokenizer, items, params, n=8, functions=..., weights=..., keep="best")
    sft_records(items, samples)      # the kept answers as chat records for SFT
    sample_summary(samples, n)       # reward, pass rate, kept, per-function means

Which samples of one prompt are kept (`select`):

- `best`: the highest total reward (the first on ties);
- `top-k`: the k highest, distinct texts only (the same answer twice teaches SFT nothing new);
- `threshold`: every distinct sample whose reward is at least the threshold.

With a threshold, `best` and `top-k` also keep only samples that reach it: with a checker's 0 / 1 reward and
threshold 1, a prompt with no correct answer contributes nothing (Llama 3's recipe keeps only answers that pass).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from alignkit.generation import SamplingParams
from alignkit.rewards.verifiable import RewardFn
from alignkit.rollout.prompts import PromptItem, prompt_fields, reward_prompts
from alignkit.rollout.rollout import generate_rollout, score_rollout

KEEP_RULES = ("best", "top-k", "threshold")


def select(rewards: Sequence[float], keep: str, *, k: int = 1, threshold: float | None = None,
           texts: Sequence[str] | None = None) -> list[int]:
    """Indices of the kept samples of one prompt, best first (see the module docstring for the rules)."""
    if keep not in KEEP_RULES:
        raise ValueError(f"keep must be one of {', '.join(KEEP_RULES)}; got {keep!r}")
    if keep == "threshold" and threshold is None:
        raise ValueError("keep 'threshold' needs a threshold")
    order = sorted(range(len(rewards)), key=lambda i: -rewards[i])  # stable: the first sample wins a tie
    if threshold is not None:
        order = [i for i in order if rewards[i] >= threshold]
    if keep == "best":
        return order[:1]
    seen: set[str] = set()
    kept = []
    for i in order:
        text = texts[i] if texts is not None else str(i)
        if text in seen:
            continue
        seen.add(text)
        kept.append(i)
    return kept[:k] if keep == "top-k" else kept


@dataclass
class Sample:
    """One sampled answer: which prompt, its text, its total and per-function rewards, and whether it was kept."""

    prompt_index: int
    completion: str
    reward: float
    rewards: dict[str, float]
    finish_reason: str
    num_tokens: int
    kept: bool = False
    rank: int | None = None  # 0 for the prompt's best kept sample, 1 for the next, ...
    extra: dict[str, Any] = field(default_factory=dict)


def sample_and_select(model: nn.Module, tokenizer: Any, items: Sequence[PromptItem], params: SamplingParams, *,
                      n: int, functions: Sequence[RewardFn], weights: Sequence[float], keep: str = "best",
                      k: int = 1, threshold: float | None = None, batch_size: int = 64,
                      first_index: int = 0) -> list[Sample]:
    """n samples of every prompt (prompt i's are [i * n, (i + 1) * n)), scored and marked kept or not.

    Prompts are generated `batch_size` at a time, each prefilled once for its n samples. `first_index` offsets
    `Sample.prompt_index` (a shard of a larger prompt list)."""
    samples: list[Sample] = []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        rollout = generate_rollout(model, tokenizer, [item.prompt_ids for item in chunk], params, group_size=n)
        totals, values = score_rollout(rollout, functions, weights, reward_prompts(chunk),
                                       prompt_fields(chunk))
        for p in range(len(chunk)):
            group = range(p * n, (p + 1) * n)
            texts = [rollout.completions[i].text or "" for i in group]
            rewards = [float(totals[i]) for i in group]
            kept = {j: rank for rank, j in enumerate(select(rewards, keep, k=k, threshold=threshold, texts=texts))}
            for j, i in enumerate(group):
                completion = rollout.completions[i]
                samples.append(Sample(
                    prompt_index=first_index + start + p, completion=texts[j], reward=rewards[j],
                    rewards={name: column[i] for name, column in values.items()},
                    finish_reason=completion.finish_reason, num_tokens=len(completion.token_ids),
                    kept=j in kept, rank=kept.get(j)))
    return samples


def sample_records(items: Sequence[PromptItem], samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Every sample with its scores, for samples.jsonl (per-function values that did not apply are null)."""
    return [{
        "prompt_index": s.prompt_index, "question": items[s.prompt_index].question,
        **({"answer": items[s.prompt_index].fields["answer"]} if "answer" in items[s.prompt_index].fields else {}),
        "completion": s.completion, "reward": s.reward,
        "rewards": {name: None if math.isnan(v) else v for name, v in s.rewards.items()},
        "finish_reason": s.finish_reason, "num_tokens": s.num_tokens, "kept": s.kept,
    } for s in samples]


def sft_records(items: Sequence[PromptItem], samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """The kept samples as chat records ({messages}: the prompt's messages + the answer), prompt by prompt, best
    first: what `alignkit train sft` reads."""
    kept = sorted((s for s in samples if s.kept), key=lambda s: (s.prompt_index, s.rank))
    return [{"messages": [*items[s.prompt_index].messages, {"role": "assistant", "content": s.completion}]}
            for s in kept]


def sample_summary(samples: Sequence[Sample]) -> dict[str, float]:
    """reward (mean over samples), pass_rate (share of prompts with a kept sample), kept, prompts, samples, each
    function's mean where it applied (`rewards/<name>/mean`), completions/mean_length and /clipped_ratio."""
    if not samples:
        return {"prompts": 0, "samples": 0, "kept": 0}
    prompts = {s.prompt_index for s in samples}
    passed = {s.prompt_index for s in samples if s.kept}
    out: dict[str, float] = {
        "reward": sum(s.reward for s in samples) / len(samples),
        "pass_rate": len(passed) / len(prompts),
        "kept": sum(s.kept for s in samples),
        "prompts": len(prompts),
        "samples": len(samples),
        "completions/mean_length": sum(s.num_tokens for s in samples) / len(samples),
        "completions/clipped_ratio": sum(s.finish_reason == "length" for s in samples) / len(samples),
    }
    for name in samples[0].rewards:
        applicable = [s.rewards[name] for s in samples if not math.isnan(s.rewards[name])]
        out[f"rewards/{name}/mean"] = sum(applicable) / len(applicable) if applicable else math.nan
    return out
