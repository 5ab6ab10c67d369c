"""Rule-based rewards for RL with verifiable answers, and the loader that combines any reward functions.

A reward function follows TRL's convention: `fn(prompts, completions, **fields) -> list[float | None]`, one value
per completion (None: not applicable to it), where `fields` holds every other field of the prompt records
(`answer`, ...) repeated per completion, and `completion_ids` (token ids). The built-ins:

- `accuracy`: 1.0 when the completion's final answer equals the record's `answer` by value, else 0.0;
- `format`: DeepSeek-R1-Zero's format reward, 1.0 for `<think>...</think><answer>...</answer>` and nothing else;
- `arithmetic`: the quickstart task's checker ("The answer is N");
- `overlong`: DAPO's soft overlong punishment (https://arxiv.org/abs/2503.14476), 0 up to
  max_completion_length - cache, then falling linearly to -1 at max_completion_length.

Answers are read from the last `\\boxed{...}`, else GSM8K's `#### n`, else an `<answer>` block, else "the answer is
n", else the last number in the text; numbers compare by value (commas, signs, decimals, fractions, a leading $).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from alignkit.errors import ConfigError, UserError

RewardFn = Callable[..., list[float | None]]

R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>."
)

_NUMBER = r"[-+]?\$?\s?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


class RewardError(UserError):
    """A reward function failed or returned something that is not one number per completion."""


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer a completion states (see the module docstring for the order), or None."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    for pattern in (r"####\s*(.+)", r"<answer>(.*?)</answer>", r"[Tt]he (?:final )?answer is[:\s]*(.+)"):
        found = re.findall(pattern, text, flags=re.DOTALL)
        if found:
            return found[-1].strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].strip() if numbers else None


def parse_number(text: str | None) -> Fraction | None:
    """A number's exact value (first number in `text`): "1,234" -> 1234, "-3.50" -> -7/2, "3/4", "$12"; None if none."""
    if text is None:
        return None
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    raw = match.group(0).replace(",", "").replace("$", "").replace(" ", "")
    try:
        if "/" in raw:
            numerator, denominator = raw.split("/")
            return Fraction(numerator) / Fraction(denominator) if int(denominator) else None
        return Fraction(raw)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(completion: str, reference: str | int | float) -> bool:
    """Whether the completion's final answer equals `reference` by value (or as text when either is not a number)."""
    predicted = extract_answer(completion)
    expected = parse_number(str(reference))
    value = parse_number(predicted)
    if expected is not None and value is not None:
        return value == expected
    return predicted is not None and predicted.strip().lower() == str(reference).strip().lower()


def accuracy(prompts: Sequence[Any], completions: Sequence[str], *, answer: Sequence[Any] | None = None,
             **_: Any) -> list[float | None]:
    """1.0 when the final answer equals the record's `answer` by value; None for a record without one."""
    if answer is None:
        raise RewardError("the accuracy reward needs an `answer` field in the prompt records")
    return [None if ref is None else float(answers_match(text, ref)) for text, ref in zip(completions, answer)]


def r1_format(prompts: Sequence[Any], completions: Sequence[str], **_: Any) -> list[float | None]:
    """1.0 for exactly `<think>...</think><answer>...</answer>` (whitespace around allowed), else 0.0."""
    return [float(bool(_FORMAT_RE.match(text))) for text in completions]


def arithmetic(prompts: Sequence[Any], completions: Sequence[str], *, answer: Sequence[Any], **_: Any
               ) -> list[float | None]:
    """The quickstart task's checker: 1.0 when "The answer is N" states the right N."""
    from alignkit.tasks.arithmetic import is_correct

    return [float(is_correct(text, ref)) for text, ref in zip(completions, answer)]


def overlong_penalty(max_completion_length: int, cache: int) -> RewardFn:
    """DAPO's soft overlong punishment on completion token counts (needs `completion_ids`)."""
    if not 0 < cache <= max_completion_length:
        raise ConfigError(f"the overlong cache must be in (0, max_completion_length]; got {cache}")

    def overlong(prompts: Sequence[Any], completions: Sequence[str], *, completion_ids: Sequence[Sequence[int]],
                 **_: Any) -> list[float | None]:
        start = max_completion_length - cache
        return [0.0 if len(ids) <= start else max(-1.0, (start - len(ids)) / cache) for ids in completion_ids]

    return overlong


BUILTINS: dict[str, RewardFn] = {"accuracy": accuracy, "format": r1_format, "arithmetic": arithmetic}


def load_reward_function(spec: str, *, device: Any = "cpu") -> RewardFn:
    """A built-in by name, `rm:PATH` (a trained reward model, loaded on `device`), `package.module:function`, or
    `path/to/file.py:function`."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    if spec.startswith("rm:"):
        from alignkit.errors import CheckpointError
        from alignkit.rewards.scoring import reward_model_function

        try:
            return reward_model_function(spec[3:], device=device)
        except (CheckpointError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"reward {spec!r}: the reward model cannot be loaded: {e}") from None
    if ":" not in spec:
        raise ConfigError(f"reward function {spec!r} is not a built-in ({', '.join(BUILTINS)}) nor rm:PATH, "
                          "module:function or path/to/file.py:function.")
    location, name = spec.rsplit(":", 1)
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise ConfigError(f"reward function {spec!r}: {path} does not exist.")
        module_spec = importlib.util.spec_from_file_location(f"alignkit_reward_{path.stem}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as e:
            raise ConfigError(f"reward function {spec!r}: cannot import {location} ({e}).") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"reward function {spec!r}: {location} has no function {name!r}.")
    return function


def load_rewards(specs: Sequence[str], weights: Sequence[float] | None = None, *, device: Any = "cpu"
                 ) -> tuple[list[RewardFn], list[float]]:
    """The reward functions of `specs` (see `load_reward_function`) and their weights (default 1.0 each)."""
    weights = list(weights) if weights is not None else [1.0] * len(specs)
    if len(weights) != len(specs):
        raise ConfigError(f"{len(weights)} reward weights for {len(specs)} reward functions; give one weight each.")
    return [load_reward_function(spec, device=device) for spec in specs], weights


def check_reward_specs(section: str, specs: Sequence[str], weights: Sequence[float] | None, example: str) -> None:
    """A config section's reward_funcs / reward_weights: at least one function, one weight each when given."""
    if not specs:
        raise ConfigError(f"{section}.reward_funcs is empty; name at least one reward function, e.g. {example}.")
    if weights is not None and len(weights) != len(specs):
        raise ConfigError(f"{section}.reward_weights has {len(weights)} values for {len(specs)} reward functions; "
                          "give one weight each.")


def reward_name(function: RewardFn) -> str:
    return getattr(function, "__name__", type(function).__name__)


def score_completions(functions: Sequence[RewardFn], weights: Sequence[float], prompts: Sequence[Any],
                      completions: Sequence[str], fields: dict[str, Sequence[Any]], *, group_size: int = 1
                      ) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted total per completion, each function's values) for N completions.

    None means "not applicable" and counts as NaN in that function's values; the total is the weighted sum of the
    applicable values (TRL's nansum). A function that raises, returns the wrong number of values, a non-number or
    NaN, is a RewardError naming the function, the prompt (completion i belongs to prompt i // group_size) and the
    start of the completion where it can tell.
    """
    if len(functions) != len(weights):
        raise ConfigError(f"{len(functions)} reward functions but {len(weights)} weights; give one weight each.")
    n = len(completions)
    totals = [0.0] * n
    values: dict[str, list[float]] = {}
    for function, weight in zip(functions, weights):
        name = reward_name(function)
        try:
            out = function(list(prompts), list(completions), **fields)
        except RewardError:
            raise
        except Exception as e:  # a user function's bug: name it and where, never a silent wrong reward
            where = _first_failing(function, prompts, completions, fields, group_size)
            raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}{where}") from e
        if not isinstance(out, (list, tuple)) or len(out) != n:
            got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
            raise RewardError(f"reward function {name!r} returned {got} values for {n} completions; return one "
                              "number (or None) per completion.")
        column: list[float] = []
        for index, value in enumerate(out):
            if value is None:
                column.append(math.nan)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise RewardError(
                    f"reward function {name!r} returned {value!r} for completion {index} of prompt "
                    f"{index // group_size} (starting {_start(completions[index])!r}); return a number, or None "
                    "when it does not apply."
                )
            column.append(float(value))
            totals[index] += weight * float(value)
        values[name] = column
    return totals, values


def _start(text: str, width: int = 60) -> str:
    return text[:width] + ("..." if len(text) > width else "")


def _first_failing(function: RewardFn, prompts: Sequence[Any], completions: Sequence[str],
                   fields: dict[str, Sequence[Any]], group_size: int) -> str:
    """", first on completion i of prompt p (starting ...)": the first completion the function fails on alone."""
    for index in range(min(len(completions), 256)):
        try:
            function([prompts[index]], [completions[index]], **{k: [v[index]] for k, v in fields.items()})
        except Exception:
            return (f", first on completion {index} of prompt {index // group_size} (starting "
                    f"{_start(completions[index])!r})")
    return ""
