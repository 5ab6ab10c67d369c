"""Generative few-shot tasks: generate an answer to each question and check it (GSM8K, the arithmetic word-problem
sets, any file of {question, answer} records); greedy accuracy or sampled pass@k, at every shot count.

Prompts, plain text (`prompt_format="text"`, the default) with lm-evaluation-harness's GSM8K layout:

    shot   = "Question: " + question + "\\nAnswer: " + worked answer + "\\n\\n"
    prompt = shot_1 + ... + shot_k + "Question: " + question + "\\nAnswer:"

decoded until a blank line or the next "Question:" (the text is cut before it) or end of text. The worked answer is
the record's `solution` when it has one, GSM8K's whole `answer` (its working and the `#### n` line), else the bare
answer. With `prompt_format="chat"` the same shots are earlier turns of the conversation (user: question,
assistant: worked answer), the question the last user turn, rendered with the model's chat template and its
generation prompt, and decoding stops at the template's end of turn.

The shots are the first K records (the shot pool), never scored, as in `alignkit.eval.tasks`. Each answer is checked
by a reward function (`alignkit.rewards.verifiable`) that scores 1 for a right answer: `accuracy` (the final
number by value: `\\boxed{}`, GSM8K's `####`, "the answer is n", else the last number), `arithmetic` (the
quickstart task's "The answer is N") or `module:function` / `file.py:function`.

Metrics: greedy decoding (one sample at temperature 0) gives `acc`; sampling (`samples` n at `temperature` > 0)
gives `pass@k` for each k <= n with the unbiased estimator of Chen et al. 2021 (https://arxiv.org/abs/2107.03374),
1 - C(n - c, k) / C(n, k) for c correct samples out of n, averaged over problems. Standard errors are over
problems (sample standard deviation / sqrt(number of problems)).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from alignkit.data.formats import extract_gsm8k_answer
from alignkit.data.readers import read_jsonl
from alignkit.errors import ConfigError, DataError
from alignkit.eval.harness import TaskResult, check_shots
from alignkit.eval.metrics import mean_stderr
from alignkit.eval.tasks import data_folder, split_shot_pool
from alignkit.eval.verifiable import generate_and_check, reward_check
from alignkit.generation import SamplingParams

if TYPE_CHECKING:
    from alignkit.model import LlamaForCausalLM
    from alignkit.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PromptFormat = Literal["text", "chat"]

# Known generative tasks: name -> file under the shared data folder. The shared GSM8K copy is its train split (the
# test split is not there): evaluating on it measures a model that was not trained on GSM8K.
SOURCES: dict[str, str] = {
    "gsm8k": "gsm8k/train.jsonl",
    "mawps_asdiv_a": "mawps_asdiv_a/train.csv",
    "multiarith": "multiarith/MultiArith.json",
    "addsub": "addsub/AddSub.json",
    "singleeq": "singleeq/questions.json",
}

# The checker each known task gets unless --check says otherwise; a file of records gets DEFAULT_CHECK.
DEFAULT_CHECK = "accuracy"
DEFAULT_CHECKS: dict[str, str] = dict.fromkeys(SOURCES, DEFAULT_CHECK)

# Plain-text decoding stops at the few-shot delimiter (a blank line) or when the model starts the next question.
STOP_STRINGS = ["\n\n", "Question:"]


@dataclass(frozen=True)
class GenerativeDoc:
    """One problem: the question, the reference answer a checker compares with, and the worked answer a shot shows."""

    index: int  # 0-based position among the task's records
    line: int  # 1-based line of a JSONL file (the record number for the CSV and JSON sets)
    question: str
    answer: str
    solution: str

    def shot(self) -> str:
        """This record as a solved plain-text example, without the delimiter that follows it."""
        return f"Question: {self.question}\nAnswer: {self.solution}"


@dataclass
class GenerativeTask:
    """A task of problems read and checked: name, path, records in order and the checker it uses by default."""

    name: str
    path: Path
    docs: list[GenerativeDoc]
    check: str = DEFAULT_CHECK
    layout: str = field(default="generative", init=False)

    def split(self, shot_pool: int) -> tuple[list[GenerativeDoc], list[GenerativeDoc]]:
        """(shot pool, scored records): the first `shot_pool` records are the pool, never scored."""
        return split_shot_pool(self.docs, shot_pool, self.path)

    def prepare(self, shots: Sequence[int], *, shot_pool: int | None = None, limit: int | None = None
                ) -> tuple[list[GenerativeDoc], list[GenerativeDoc]]:
        """(shot pool, scored records) for these shot counts (pool: the largest shot count unless given; scored:
        the next `limit`, default all); every error about them before the model loads."""
        pool, docs = self.split(max(shots) if shot_pool is None else shot_pool)
        if max(shots) > len(pool):
            raise ConfigError(
                f"{max(shots)} shots need {max(shots)} examples, but the shot pool holds {len(pool)}; raise "
                f"--shot-pool to at least {max(shots)} or ask for fewer shots."
            )
        if limit is not None:
            if limit < 1:
                raise ConfigError(f"--limit must be at least 1; got {limit}.")
            docs = docs[:limit]
        return pool, docs


# ---------------------------------------------------------------------------------------------- loading


def _root(data_dir: str | Path | None) -> Path | None:
    return Path(data_dir) if data_dir is not None else data_folder()


def is_generative(spec: str) -> bool:
    """Whether `spec` names a generative task: a known name (`SOURCES`), or a JSONL file whose first record has a
    `question` and no `choices` (a multiple-choice layout)."""
    path = Path(spec)
    if path.is_file():
        records = read_jsonl(path) if path.suffix in (".jsonl", ".gz") else []
        return bool(records) and isinstance(records[0], dict) and "question" in records[0] and \
            "choices" not in records[0]
    return spec in SOURCES


def _reference(raw: Any, where: str) -> tuple[str, str]:
    """(reference answer, worked answer) of a record's `answer`: GSM8K's "working\\n#### 72" gives ("72", the
    whole text); anything else is its own worked answer."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise DataError(f"{where}: 'answer' must be a string or a number; got {type(raw).__name__} {raw!r:.60}.")
    if isinstance(raw, str) and "####" in raw:
        answer = extract_gsm8k_answer(raw) if raw.rsplit("####", 1)[1].strip() else None
        if not answer:
            raise DataError(f"{where}: the answer has a '####' marker but no final answer after it.")
        return answer, raw.strip()
    text = str(raw).strip()
    if not text:
        raise DataError(f"{where}: 'answer' is empty; give the reference answer.")
    return text, text


def parse_problem(record: Any, *, index: int, line: int, where: str) -> GenerativeDoc:
    """One {question, answer[, solution]} record as a GenerativeDoc; a DataError naming file and line otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a problem record must be a JSON object with 'question' and 'answer'.")
    missing = [key for key in ("question", "answer") if record.get(key) is None]
    if missing:
        raise DataError(f"{where}: missing {' and '.join(repr(m) for m in missing)}; every record of a generative "
                        f"task needs a 'question' and an 'answer' (it has {sorted(record)}).")
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: 'question' must be a non-empty string; got {question!r:.60}.")
    answer, solution = _reference(record["answer"], where)
    if record.get("solution") is not None:
        if not isinstance(record["solution"], str) or not record["solution"].strip():
            raise DataError(f"{where}: 'solution' must be a non-empty string when given.")
        solution = record["solution"].strip()
    return GenerativeDoc(index, line, question.strip(), answer, solution)


def load_generative_task(spec: str, data_dir: str | Path | None = None) -> GenerativeTask:
    """A generative task by known name (`SOURCES`, read from the shared data folder) or JSONL path."""
    path = Path(spec)
    if path.is_file():
        records = read_jsonl(path)  # a bad JSON line is a DataError naming file and line
        text = path.read_text(encoding="utf-8") if path.suffix != ".gz" else None
        lines = ([n for n, line in enumerate(text.splitlines(), start=1) if line.strip()] if text is not None
                 else list(range(1, len(records) + 1)))
        name = path.name.removesuffix(".gz").removesuffix(".jsonl")
        check = DEFAULT_CHECK
    else:
        root = _root(data_dir)
        if spec not in SOURCES:
            raise ConfigError(f"unknown generative task {spec!r}; known: {', '.join(SOURCES)} (files in the shared "
                              "data folder), or the path of a JSONL file of {question, answer} records.")
        if root is None or not (root / SOURCES[spec]).is_file():
            raise DataError(f"task {spec}: {SOURCES[spec]} is not in the shared data folder ({root or 'none found'}"
                            "); set --data-dir or ALIGNKIT_SHARED_DATA to the folder that holds it.")
        path, name, check = root / SOURCES[spec], spec, DEFAULT_CHECKS[spec]
        if spec == "gsm8k":
            records = read_jsonl(path)
        else:
            from alignkit.tasks.word_problems import read_source

            records = read_source(root, spec)
        lines = list(range(1, len(records) + 1))
    if not records:
        raise DataError(f"{path}: the task file has no records.")
    docs = [parse_problem(record, index=i, line=lines[i], where=f"{path}:{lines[i]}")
            for i, record in enumerate(records)]
    return GenerativeTask(name=name, path=path, docs=docs, check=check)


# ---------------------------------------------------------------------------------------------- prompts


def text_prompt(pool: Sequence[GenerativeDoc], num_shots: int, doc: GenerativeDoc) -> str:
    """The plain-text prompt: `num_shots` solved examples from the pool, each followed by a blank line, then the
    question and "Answer:" (the model writes the space and the answer)."""
    shots = "".join(shot.shot() + "\n\n" for shot in pool[:num_shots])
    return f"{shots}Question: {doc.question}\nAnswer:"


def chat_messages(pool: Sequence[GenerativeDoc], num_shots: int, doc: GenerativeDoc) -> list[dict[str, str]]:
    """The chat prompt: each shot a user turn (its question) and an assistant turn (its worked answer), then the
    question as the last user turn."""
    messages = []
    for shot in pool[:num_shots]:
        messages += [{"role": "user", "content": shot.question}, {"role": "assistant", "content": shot.solution}]
    return [*messages, {"role": "user", "content": doc.question}]


# ---------------------------------------------------------------------------------------------- metrics


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples with c correct: 1 - C(n - c, k) / C(n, k) (Chen et al. 2021),
    the chance that k samples drawn without replacement from the n include a correct one. Exact integers, so no
    cancellation for large n."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n; got k={k}, n={num_samples}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"the number correct must be in [0, n]; got c={num_correct}, n={num_samples}")
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


@dataclass(frozen=True)
class GenerationSettings:
    """How every generative task of a run is decoded and scored."""

    prompt_format: PromptFormat = "text"
    check: str | None = None  # None: each task's own default
    samples: int = 1
    temperature: float = 0.0
    pass_k: tuple[int, ...] = ()  # empty: (1,) and, for more than one sample, n as well
    max_new_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] = ()  # empty: STOP_STRINGS for text prompts, the end of turn alone for chat


    def __post_init__(self) -> None:
        if self.prompt_format not in ("text", "chat"):
            raise ConfigError(f"--prompt-format must be text or chat; got {self.prompt_format!r}.")
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1; got {self.samples}.")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be 0 (greedy) or more; got {self.temperature}.")
        if self.temperature == 0 and self.samples > 1:
            raise ConfigError(f"--samples {self.samples} at --temperature 0 would give {self.samples} copies of the "
                              "greedy answer; set --temperature above 0 (e.g. 0.8) to sample.")
        if any(not s for s in self.stop):
            raise ConfigError("--stop got an empty string; give the text that ends an answer, e.g. '\\n'.")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1; got {self.max_new_tokens}.")
        for k in self.pass_k:
            if not 1 <= k <= self.samples:
                raise ConfigError(f"pass@{k} needs at least {k} samples per problem, but --samples is "
                                  f"{self.samples}; ask for k between 1 and {self.samples}, or more samples.")
        if self.check is not None:
            load_check(self.check)  # a wrong name fails before the model loads
        if self.pass_k and self.is_greedy:
            raise ConfigError("--pass-k needs sampling (--samples N --temperature T > 0); greedy decoding reports "
                              "acc.")

    @property
    def stop_strings(self) -> list[str] | None:
        if self.stop:
            return list(self.stop)
        return STOP_STRINGS if self.prompt_format == "text" else None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def ks(self) -> list[int]:
        return sorted(set(self.pass_k or ((1,) if self.samples == 1 else (1, self.samples))))

    def describe(self, checks: dict[str, str]) -> dict[str, Any]:
        """What results.json records of the decoding; `checks`: task -> its default checker."""
        return {
            "prompt_format": self.prompt_format, "checks": {t: self.check or c for t, c in checks.items()},
            "samples": self.samples, "temperature": self.temperature,
            "metrics": ["acc"] if self.is_greedy else [f"pass@{k}" for k in self.ks],
            "max_new_tokens": self.max_new_tokens, "seed": None if self.is_greedy else self.seed,
            "stop_strings": self.stop_strings, "stops_at_end_of_turn": True,
        }

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, n=self.samples,
                              stop_strings=self.stop_strings,
                              seed=None if self.is_greedy else self.seed)


def _extractor(check: str) -> Callable[[str], str | None] | None:
    """The function that reads the answer a built-in checker compares, for the samples file."""
    if check == "accuracy":
        from alignkit.rewards.verifiable import extract_answer

        return extract_answer
    if check == "arithmetic":
        from alignkit.tasks.arithmetic import extract_answer as arithmetic_answer

        return arithmetic_answer
    return None


def load_check(spec: str) -> Callable[[str, str], bool]:
    """is_correct(completion, reference) of a reward function that scores 1 for a right answer; a failure names it."""
    if spec.startswith("rm:"):
        raise ConfigError(f"--check {spec}: a reward model gives scores, not right or wrong; use accuracy, "
                          "arithmetic or module:function (a function that returns 1.0 for a right answer).")
    check = reward_check(spec)

    def safe(completion: str, reference: str) -> bool:
        try:
            return check(completion, reference)
        except Exception as e:  # a checker that cannot read this reference: say which, never a traceback
            raise ConfigError(f"--check {spec} failed on the reference answer {reference!r} ({type(e).__name__}: "
                              f"{e}); pick a checker that reads such answers (accuracy compares numbers by "
                              "value).") from e

    return safe


def evaluate_generative_task(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    task: GenerativeTask,
    shots: Sequence[int],
    settings: GenerationSettings,
    *,
    shot_pool: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
) -> list[TaskResult]:
    """One result per shot count: `acc` (greedy) or `pass@k` (sampled) with standard errors, and per-problem
    samples {index, line, prompt, reference, completions, extracted, correct, num_correct, and the metrics}."""
    shots = check_shots(shots)
    pool, docs = task.prepare(shots, shot_pool=shot_pool, limit=limit)
    check_name = settings.check or task.check
    check, extract = load_check(check_name), _extractor(check_name)
    params = settings.sampling_params()
    results = []
    for k in shots:
        start = time.perf_counter()
        prompts: list[Any]
        if settings.prompt_format == "chat":
            prompts = [chat_messages(pool, k, doc) for doc in docs]
            ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True).input_ids for m in prompts]
        else:
            prompts = [text_prompt(pool, k, doc) for doc in docs]
            ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
        checked = generate_and_check(model, tokenizer, ids, [doc.answer for doc in docs], params, check=check,
                                     batch_size=batch_size)
        per_metric: dict[str, list[float]] = {}
        samples = []
        for doc, prompt, outputs in zip(docs, prompts, checked):
            correct = [ok for _, ok in outputs]
            values = ({"acc": float(correct[0])} if settings.is_greedy else
                      {f"pass@{j}": pass_at_k(len(correct), sum(correct), j) for j in settings.ks})
            for name, value in values.items():
                per_metric.setdefault(name, []).append(value)
            completions = [text for text, _ in outputs]
            samples.append({
                "index": doc.index, "line": doc.line, "prompt": prompt, "reference": doc.answer,
                "completions": completions,
                "extracted": [extract(text) for text in completions] if extract is not None else None,
                "correct": correct, "num_correct": sum(correct), **values,
            })
        metrics: dict[str, float] = {}
        for name, column in per_metric.items():
            metrics[name], metrics[f"{name}_stderr"] = mean_stderr(column)
        result = TaskResult(task.name, k, len(docs), metrics, samples, elapsed_s=time.perf_counter() - start)
        summary = ", ".join(f"{m} {result.metrics[m]:.4f}" for m in result.metric_names)
        logger.info(f"{task.name} {k}-shot ({settings.prompt_format}, check {check_name}): {summary} "
                    f"(n={result.num_items}, {result.elapsed_s:.1f}s)")
        results.append(result)
    return results
