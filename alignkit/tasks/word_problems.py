"""Arithmetic word problems from MAWPS, ASDiv-A, MultiArith, AddSub and SingleEq as verifiable prompts.

    python -m alignkit.tasks.word_problems --out runs/data/word_problems [--data ../shared/data]
    python -m alignkit.tasks.word_problems --evaluate runs/grpo_smollm2_word_problems --eval-file .../eval.jsonl

The four files overlap heavily (`mawps_asdiv_a/train.csv` holds all of MultiArith and most of AddSub and SingleEq),
so they are read as one pool: every problem becomes `{"question", "answer", "source"}` with the answer as a clean
number string (504.0 -> "504", 2.5 -> "2.5"), copies with the same normalised question are merged, and each
problem goes to train or eval by a fixed hash (`split_of`). The hash is taken over the problem's numbers and its
answer rather than its wording, because the sets also hold near-copies that differ by a word ("She has 27
seashell ." / "She has 27 seashell left."); a split by wording would put one copy in train and the other in eval.

Dropped, and counted in the summary: problems whose answer or whose numbers have more than `MAX_DECIMALS` decimal
places (the sources store 1/6 as 0.16666666666666666; a model that answers 0.17 is right, but an exact check would
mark it wrong), and questions whose copies disagree on the answer.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.errors import DataError, UserError

logger = logging.getLogger(__name__)

# name -> file under the shared data folder. Earlier sources win when copies are merged: the JSON sets keep their
# original punctuation, while mawps_asdiv_a's text is tokenised ("books , how many") and has its numbers masked.
SOURCES: dict[str, str] = {
    "multiarith": "multiarith/MultiArith.json",
    "addsub": "addsub/AddSub.json",
    "singleeq": "singleeq/questions.json",
    "mawps_asdiv_a": "mawps_asdiv_a/train.csv",
}

# Per mille of the problems' split keys held out for evaluation (295 of the 2,789 problems kept from the shared files).
EVAL_PER_MILLE = 110

# Problems whose answer or numbers have more decimal places than this are dropped (see the module docstring).
MAX_DECIMALS = 2

# The system prompt of the recipe and of `evaluate`: SmolLM2-135M-Instruct already ends many answers with
# "The answer is: N", and asking for it makes the final number easy to find for the checker.
SYSTEM_PROMPT = "Solve the math word problem. End your reply with \"The answer is N.\" where N is the final number."

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_MASK = re.compile(r"number(\d+)")


def format_number(value: float | int | str) -> str:
    """A number as a clean string: 504.0 -> "504", 2.5 -> "2.5", "43" -> "43"; a DataError for non-numbers."""
    try:
        number = float(str(value).replace(",", ""))
    except ValueError:
        raise DataError(f"{value!r} is not a number") from None
    if number.is_integer():
        return str(int(number))
    return repr(number)  # the shortest text that reads back as the same float: 0.1 -> "0.1", not 0.1000000000000000055


def decimals(number: str) -> int:
    """Decimal places of a number written as text: "2.5" -> 1, "504" -> 0."""
    return len(number.partition(".")[2])


def clean_text(text: str) -> str:
    """Undo the word tokenisation of the MAWPS files: "books , how" -> "books, how", "$ 5" -> "$5", "did n't" ->
    "didn't", "Joan 's" -> "Joan's"; runs of whitespace become one space."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r" ([.,?!;:%])", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ll|'ve|'m|'d)\b", r"\1", text)
    return re.sub(r"\$ (?=\d)", "$", text)


def unmask(question: str, numbers: str) -> str:
    """Put mawps_asdiv_a's numbers back: `number<i>` -> the i-th of the space-separated `numbers`, as
    `format_number` writes it ("56.0" -> "56")."""
    values = numbers.split()

    def value(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if index >= len(values):
            raise DataError(f"{match.group(0)} has no value among the {len(values)} numbers {numbers!r}")
        return format_number(values[index])

    return _MASK.sub(value, question)


def normalise(question: str) -> str:
    """The key that finds copies of a problem: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", question.lower())


def read_mawps_asdiv_a(path: str | Path) -> list[dict[str, str]]:
    """mawps_asdiv_a/train.csv -> [{question, answer, source}], numbers unmasked and punctuation re-attached."""
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.DictReader(f), start=2):
            try:
                question = clean_text(unmask(row["Question"], row["Numbers"]))
                answer = format_number(row["Answer"])
            except (DataError, KeyError, TypeError) as e:
                raise DataError(f"{path}, line {line_no}: {e}") from None
            records.append({"question": question, "answer": answer, "source": "mawps_asdiv_a"})
    return records


def read_solutions_json(path: str | Path, source: str) -> list[dict[str, str]]:
    """MultiArith / AddSub / SingleEq JSON (a list of {sQuestion, lSolutions, ...}) -> [{question, answer, source}];
    the answer is lSolutions[0]."""
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    records = []
    for index, item in enumerate(items):
        try:
            question = clean_text(item["sQuestion"])
            answer = format_number(item["lSolutions"][0])
        except (DataError, KeyError, IndexError, TypeError) as e:
            raise DataError(f"{path}, record {index}: {type(e).__name__}: {e}") from None
        records.append({"question": question, "answer": answer, "source": source})
    return records


def read_source(data_dir: str | Path, name: str) -> list[dict[str, str]]:
    path = Path(data_dir) / SOURCES[name]
    if not path.is_file():
        raise DataError(f"{path} does not exist; point --data at the shared data folder that holds {SOURCES[name]}.")
    return read_mawps_asdiv_a(path) if name == "mawps_asdiv_a" else read_solutions_json(path, name)


def checkable(record: dict[str, str]) -> bool:
    """Whether an exact check of the answer is fair: answer and numbers within `MAX_DECIMALS` decimal places."""
    numbers = [record["answer"], *_NUMBER.findall(record["question"])]
    return all(decimals(n) <= MAX_DECIMALS for n in numbers)


def merge(records: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], dict[str, int]]:
    """(problems, counts): records with too many decimals dropped, copies (same `normalise`d question) merged into
    the first, questions whose copies disagree on the answer dropped. Order is that of first appearance."""
    counts = {"read": len(records), "too_many_decimals": 0, "copies": 0, "conflicting_answers": 0}
    groups: dict[str, list[dict[str, str]]] = {}
    for record in records:
        if not checkable(record):
            counts["too_many_decimals"] += 1
            continue
        groups.setdefault(normalise(record["question"]), []).append(record)
    problems = []
    for copies in groups.values():
        if len({c["answer"] for c in copies}) > 1:
            counts["conflicting_answers"] += len(copies)
            continue
        counts["copies"] += len(copies) - 1
        problems.append(copies[0])
    counts["kept"] = len(problems)
    return problems, counts


def split_key(record: dict[str, str]) -> str:
    """The numbers of the question (sorted) and the answer: equal for near-copies that differ only in wording."""
    numbers = sorted(format_number(n) for n in _NUMBER.findall(record["question"]))
    return " ".join(numbers) + " -> " + record["answer"]


def split_of(record: dict[str, str]) -> str:
    """"train" or "eval" for a problem; fixed forever (crc32, not hash(): Python salts str hashes per process)."""
    return "eval" if zlib.crc32(split_key(record).encode()) % 1000 < EVAL_PER_MILLE else "train"


def load_splits(data_dir: str | Path) -> tuple[list[dict[str, str]], list[dict[str, str]], dict[str, int]]:
    """(train, eval, counts) from the four files under `data_dir`."""
    records = [record for name in SOURCES for record in read_source(data_dir, name)]
    problems, counts = merge(records)
    train = [p for p in problems if split_of(p) == "train"]
    held_out = [p for p in problems if split_of(p) == "eval"]
    counts.update(train=len(train), eval=len(held_out))
    return train, held_out, counts


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_splits(out_dir: str | Path, data_dir: str | Path) -> dict[str, int]:
    """Write `out_dir/train.jsonl` and `out_dir/eval.jsonl`; returns the counts."""
    train, held_out, counts = load_splits(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held_out)
    return counts


# ---------------------------------------------------------------------------------------------------------------
# A format reward for GRPO (`grpo.reward_funcs: [accuracy, alignkit.tasks.word_problems:stated_answer]`)

_ANSWER_PHRASE = re.compile(r"the answer is", re.IGNORECASE)
_FINAL_LINE = re.compile(r"the answer is:?\s*\$?-?\d[\d,]*(?:\.\d+)?\s*[.!]?\s*$", re.IGNORECASE)


def stated_answer(prompts: Sequence[Any], completions: Sequence[str], **_: Any) -> list[float | None]:
    """1.0 when the reply says "The answer is N" exactly once and stops right after it, else 0.0.

    SmolLM2-135M-Instruct often repeats "The answer is 7." until the token budget runs out, and a cut-off reply
    cannot be right; this rewards finishing the reply where the answer is stated, whatever the number.
    """
    return [float(len(_ANSWER_PHRASE.findall(text)) == 1 and bool(_FINAL_LINE.search(text))) for text in completions]


# ---------------------------------------------------------------------------------------------------------------
# Held-out accuracy


@dataclass(frozen=True)
class WordProblem:
    """One problem in the shape `alignkit.eval.verifiable.verifiable_accuracy` reads."""

    question: str
    answer: str
    system_prompt: str | None = SYSTEM_PROMPT

    @property
    def reference(self) -> str:
        return self.answer

    def prompt_messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": self.question}]


def read_problems(path: str | Path, *, system_prompt: str | None = SYSTEM_PROMPT,
                  limit: int | None = None) -> list[WordProblem]:
    """{question, answer} JSONL -> problems (the first `limit` when set). The reference is read as GRPO's prompt
    reader reads it (`alignkit.data.formats.verifiable_prompts`): GSM8K's "...\\n#### 72" gives "72"."""
    from alignkit.data.formats import verifiable_prompts
    from alignkit.data.readers import read_jsonl

    records = read_jsonl(path)[:limit]
    prompts = verifiable_prompts(records, source=str(path))
    return [WordProblem(p.messages[-1]["content"], p.answer, system_prompt) for p in prompts]


def evaluate(model_path: str, eval_file: str | Path, *, system_prompt: str | None = SYSTEM_PROMPT,
             max_new_tokens: int = 200, temperature: float = 0.0, samples_per_problem: int = 1,
             batch_size: int = 64, limit: int | None = None, seed: int = 0, num_examples: int = 5) -> dict[str, Any]:
    """Accuracy of a model (HF directory, .gguf, alignkit run, or an installed name) on a problems file: each
    question through the chat template with `system_prompt`, greedy (or sampled at `temperature`), and the final
    answer checked by value with `alignkit.rewards.verifiable.answers_match`, the `accuracy` reward of GRPO. The
    result is `verifiable_accuracy`'s, with the first `num_examples` replies."""
    import alignkit
    from alignkit.eval.verifiable import verifiable_accuracy
    from alignkit.rewards.verifiable import answers_match

    model, tokenizer = alignkit.load(model_path)
    if tokenizer is None:
        raise UserError(f"{model_path} has no tokenizer; evaluate a model saved with its tokenizer.")
    problems = read_problems(eval_file, system_prompt=system_prompt, limit=limit)
    return verifiable_accuracy(model, tokenizer, problems, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               is_correct=answers_match, temperature=temperature,
                               samples_per_problem=samples_per_problem, seed=seed, num_examples=num_examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alignkit.tasks.word_problems",
        description="Write train.jsonl / eval.jsonl of arithmetic word problems (MAWPS, ASDiv-A, MultiArith, AddSub, "
        "SingleEq), or evaluate a model's accuracy on eval.jsonl.")
    parser.add_argument("--out", help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--data", default="../shared/data", help="the shared data folder (default: ../shared/data)")
    parser.add_argument("--evaluate", metavar="MODEL", help="a model to evaluate (path, run directory or name)")
    parser.add_argument("--eval-file", help="problems to evaluate on (default: OUT/eval.jsonl)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: one sample each")
    parser.add_argument("--samples", type=int, default=1, help="samples per problem when --temperature > 0")
    parser.add_argument("--limit", type=int, help="evaluate only the first N problems")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--examples", type=int, default=5, help="replies to include in the output (default 5)")
    parser.add_argument("--no-system-prompt", action="store_true", help="ask the bare question (no system message)")
    args = parser.parse_args(argv)
    if not args.out and not args.evaluate:
        parser.error("give --out (write the splits), --evaluate MODEL, or both")
    try:
        if args.out:
            counts = write_splits(args.out, args.data)
            print(json.dumps(counts))
        if args.evaluate:
            eval_file = args.eval_file or (Path(args.out) / "eval.jsonl" if args.out else None)
            if eval_file is None:
                parser.error("--evaluate needs --eval-file (or --out, whose eval.jsonl is used)")
            result = evaluate(args.evaluate, eval_file, system_prompt=None if args.no_system_prompt else SYSTEM_PROMPT,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              samples_per_problem=args.samples, batch_size=args.batch_size, limit=args.limit,
                              num_examples=args.examples)
            print(json.dumps({"model": args.evaluate, "temperature": args.temperature, **result}, indent=1))
    except UserError as e:
        print(f"word_problems: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
