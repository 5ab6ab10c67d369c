"""Accuracy on problems with a checkable answer: greedy or sampled decoding through the chat template, then an
exact check."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from alignkit.generation import SamplingParams, generate
from alignkit.generation.packed import packed_linears

if TYPE_CHECKING:
    from alignkit.model import LlamaForCausalLM
    from alignkit.tokenizer import Tokenizer


class VerifiableProblem(Protocol):
    """What a problem must offer: the prompt as chat messages and the reference answer."""

    @property
    def reference(self) -> str: ...

    def prompt_messages(self) -> list[dict[str, str]]: ...


@dataclass(frozen=True)
class CheckedProblem:
    """A task file's record: the question for the user and the answer a checker compares with."""

    question: str
    answer: Any

    @property
    def reference(self) -> str:
        return str(self.answer)

    def prompt_messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]


def load_problems(path: str | Path) -> list[CheckedProblem]:
    """The records {"question", "answer"} of a task file; a record without them is a DataError naming it."""
    from alignkit.data import load_records
    from alignkit.errors import DataError

    if not Path(path).exists():
        raise DataError(f"task file {path} does not exist.")
    problems = []
    for number, record in enumerate(load_records(str(path)), start=1):
        missing = [key for key in ("question", "answer") if not isinstance(record, dict) or record.get(key) is None]
        if missing or not isinstance(record["question"], str):
            raise DataError(f"{path}: record {number} needs a string `question` and an `answer` "
                            f"({'missing ' + ', '.join(missing) if missing else 'question is not a string'}).")
        problems.append(CheckedProblem(record["question"], record["answer"]))
    if not problems:
        raise DataError(f"task file {path} has no records.")
    return problems


def reward_check(spec: str) -> Callable[[str, str], bool]:
    """is_correct(completion, reference) from a reward function: correct when it scores at least 1."""
    from alignkit.rewards.verifiable import load_reward_function

    function = load_reward_function(spec)

    def check(completion: str, reference: str) -> bool:
        [value] = function([None], [completion], answer=[reference])
        return value is not None and value >= 1.0

    return check


def _default_check(completion: str, reference: str) -> bool:
    from alignkit.tasks.arithmetic import is_correct

    return is_correct(completion, reference)


def generate_and_check(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    references: Sequence[str],
    params: SamplingParams,
    *,
    check: Callable[[str, str], bool],
    batch_size: int = 64,
) -> list[list[tuple[str, bool]]]:
    """`params.n` completions of every prompt (token ids), each checked with `check(completion, reference)`:
    [(text, correct)] per prompt, in order.

    Prompts go to `generate` `batch_size` at a time. Sampling: the chunk that starts at prompt `start` gets the
    seed `params.seed + start`, so a run is reproducible whatever else ran before it.
    """
    checked: list[list[tuple[str, bool]]] = []
    with packed_linears(model, batch_size=batch_size * params.n):  # pack the weights once for every chunk
        for start in range(0, len(prompts), batch_size):
            chunk_params = params
            if params.temperature > 0 and params.seed is not None:
                chunk_params = dataclasses.replace(params, seed=params.seed + start)
            completions = generate(model, prompts[start : start + batch_size], chunk_params, tokenizer=tokenizer)
            for index, completion in enumerate(completions):
                if index % params.n == 0:
                    checked.append([])
                text = completion.text if completion.text is not None else tokenizer.decode(completion.token_ids)
                reference = references[start + index // params.n]
                checked[-1].append((text, bool(check(text, reference))))
    return checked


def verifiable_accuracy(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    problems: Sequence[VerifiableProblem],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    is_correct: Callable[[str, str], bool] | None = None,
    num_examples: int = 5,
    prompt_format: str = "chat",
    temperature: float = 0.0,
    samples_per_problem: int = 1,
    seed: int = 0,
    tallies: dict[str, Callable[[str, Any], bool]] | None = None,
) -> dict[str, Any]:
    """Decode an answer to every problem (greedy, or `samples_per_problem` samples at `temperature` > 0 from a
    generator seeded with `seed`) and check each with `is_correct(completion, reference)`.

    Each prompt is the problem's messages rendered with the tokenizer's chat template and the assistant
    generation prompt; decoding stops at the tokenizer's stop tokens (end of turn / EOS). `is_correct` defaults to
    the arithmetic task's check ("The answer is N"). `prompt_format="text"` instead feeds the bare question as
    plain text and stops at the end of the line, which is how a pretrained model saw such problems (no chat
    template). Returns {"accuracy", "num", "num_correct", "examples"} where
    `examples` holds the first `num_examples` as {"prompt", "completion", "reference", "correct"}. With several
    samples, accuracy is over all samples (the expected accuracy of one sample: pass@1) and `num_correct` counts
    correct samples. `tallies` {name: fn(completion, problem)} adds {"shares": {name: share of samples}} (the
    share of answers with a given kind of mistake, say).
    """
    check = is_correct or _default_check
    if prompt_format not in ("chat", "text"):
        raise ValueError(f"prompt_format must be 'chat' or 'text', got {prompt_format!r}")
    chat = prompt_format == "chat"
    if samples_per_problem < 1 or (temperature == 0.0 and samples_per_problem > 1):
        raise ValueError(f"samples_per_problem must be >= 1, and 1 for greedy decoding; got {samples_per_problem}")
    n = samples_per_problem
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=n,
                            stop_strings=None if chat else ["\n"], seed=seed if temperature > 0 else None)
    if chat:
        prompts = [tokenizer.apply_chat_template(p.prompt_messages(), add_generation_prompt=True).input_ids
                   for p in problems]
    else:
        prompts = [tokenizer.encode(p.prompt_messages()[-1]["content"], add_special_tokens=True) for p in problems]
    checked = generate_and_check(model, tokenizer, prompts, [p.reference for p in problems], params, check=check,
                                 batch_size=batch_size)
    num_correct = 0
    counts = dict.fromkeys(tallies or {}, 0)
    examples: list[dict[str, Any]] = []
    for problem, samples in zip(problems, checked):
        for text, correct in samples:
            num_correct += correct
            for name, tally in (tallies or {}).items():
                counts[name] += bool(tally(text, problem))
            if len(examples) < num_examples:
                prompt = problem.prompt_messages()[-1]["content"]
                examples.append(
                    {"prompt": prompt, "completion": text, "reference": problem.reference, "correct": correct}
                )
    num = len(problems)
    return {
        "accuracy": num_correct / (num * n) if num else 0.0,
        "num": num,
        "num_correct": num_correct,
        "examples": examples,
        **({"shares": {name: count / (num * n) if num else 0.0 for name, count in counts.items()}} if tallies else {}),
    }
