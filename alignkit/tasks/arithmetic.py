"""A built-in task with a checkable answer: arithmetic word problems, generated from a seed.

"Tom has 12 apples and buys 7 more. How many apples does Tom have now?"  ->  "12 + 7 = 19. The answer is 19."

Everything the quickstart pipeline needs comes from here, with no download: a raw-text corpus for pretraining,
chat records for SFT, preference pairs (a correct answer and a plausible wrong one) for reward models and DPO,
and held-out problems whose answers `is_correct` checks exactly.

Train and held-out problems never share an operand pair: `split_of(operation, a, b)` assigns every pair to one
split by a fixed hash, whatever the seed, so a model can only score on held-out problems by computing the answer.
Held-out `+` and `x` pairs are chosen among pairs whose swapped order stays in training (7 x 8 is held out only
when 8 x 7 is trained on); a small model can then get them right by learning that the order does not matter,
rather than needing a multiplication fact it has never seen.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Any

OPERATIONS = ("+", "-", "x")

# difficulty -> operation -> (smallest, largest) operand. `-` draws a > b so answers stay positive.
OPERAND_RANGES: dict[int, dict[str, tuple[int, int]]] = {
    1: {"+": (1, 20), "-": (2, 20), "x": (2, 9)},
    2: {"+": (1, 50), "-": (2, 50), "x": (2, 12)},
    3: {"+": (10, 99), "-": (10, 99), "x": (2, 20)},
}

# Percent of eligible operand pairs held out for evaluation.
HELDOUT_PERCENT = 15

NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Max", "Zoe")
OBJECTS = ("apples", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "books")
CONTAINERS = ("bags", "boxes", "jars", "baskets")
GAIN_VERBS = ("buys", "finds", "gets", "picks up")
LOSS_VERBS = ("gives away", "sells", "loses", "uses")

# One or two phrasings per operation. {n}: name, {o}: objects, {c}: containers, {v}: verb, {a}/{b}: operands.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "{n} has {a} {o} and {v} {b} more. How many {o} does {n} have now?",
        "There are {a} {o} in a box. {n} {v} {b} more {o} and puts them in the box. How many {o} are in the box now?",
    ),
    "-": (
        "{n} has {a} {o} and {v} {b} of them. How many {o} does {n} have left?",
        "{n} has {a} {o}. {n} {v} {b} of the {o}. How many {o} are left?",
    ),
    "x": (
        "{n} has {a} {c} with {b} {o} in each. How many {o} does {n} have in total?",
        "There are {a} {c}. Each one holds {b} {o}. How many {o} are there altogether?",
    ),
}

FILLER = (
    "{n} likes to count {o}.",
    "{n} keeps the {o} in {c}.",
    "Counting is easy when you go one step at a time.",
    "{n} and a friend share their {o}.",
    "To add, put the two groups together. To subtract, take some away.",
    "To multiply, add the same number again and again.",
    "{n} checks the answer twice.",
    "Some {c} are full of {o}.",
)

ANSWER_PATTERN = re.compile(r"[Tt]he answer is\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    """One word problem: `question` for the user, `solution` as the assistant should answer it."""

    question: str
    solution: str
    answer: int
    operation: str
    operands: tuple[int, int]

    @property
    def reference(self) -> str:
        """The answer as `extract_answer` returns it from a correct completion."""
        return str(self.answer)

    def prompt_messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]

    def messages(self) -> list[dict[str, str]]:
        return [*self.prompt_messages(), {"role": "assistant", "content": self.solution}]


def compute(operation: str, a: int, b: int) -> int:
    if operation == "+":
        return a + b
    if operation == "-":
        return a - b
    if operation == "x":
        return a * b
    raise ValueError(f"unknown operation {operation!r}; expected one of {OPERATIONS}")


def format_solution(operation: str, a: int, b: int, answer: int) -> str:
    """The worked line and the final number in the one form `extract_answer` reads."""
    return f"{a} {operation} {b} = {answer}. The answer is {answer}."


def _pair_hash(operation: str, a: int, b: int) -> int:
    # crc32, not hash(): Python salts str hashes per process, and the split must never move.
    return zlib.crc32(f"{operation}:{a}:{b}".encode()) % 100


def split_of(operation: str, a: int, b: int) -> str:
    """'train' or 'heldout' for an operand pair; fixed forever, independent of seed and difficulty."""
    if operation in ("+", "x"):
        if a == b:
            return "train"
        # Hold out at most one order of a commutative pair, decided on the sorted pair so both orders agree.
        lo, hi = min(a, b), max(a, b)
        held = _pair_hash(operation, lo, hi) < HELDOUT_PERCENT
        return "heldout" if held and a > b else "train"
    return "heldout" if _pair_hash(operation, a, b) < HELDOUT_PERCENT else "train"


def operand_pairs(operation: str, difficulty: int, split: str) -> list[tuple[int, int]]:
    """All operand pairs of one operation at one difficulty that belong to `split`."""
    if difficulty not in OPERAND_RANGES:
        raise ValueError(f"difficulty must be one of {sorted(OPERAND_RANGES)}, got {difficulty!r}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    lo, hi = OPERAND_RANGES[difficulty][operation]
    pairs = [
        (a, b)
        for a in range(lo, hi + 1)
        for b in range(lo if operation != "-" else 1, hi + 1)
        if (operation != "-" or b < a)
    ]
    return [p for p in pairs if split_of(operation, *p) == split]


def render_problem(operation: str, a: int, b: int, rng: random.Random) -> Problem:
    template = rng.choice(TEMPLATES[operation])
    verbs = GAIN_VERBS if operation == "+" else LOSS_VERBS
    question = template.format(
        n=rng.choice(NAMES), o=rng.choice(OBJECTS), c=rng.choice(CONTAINERS), v=rng.choice(verbs), a=a, b=b
    )
    answer = compute(operation, a, b)
    return Problem(question, format_solution(operation, a, b, answer), answer, operation, (a, b))


def make_problems(
    n: int, seed: int = 0, difficulty: int = 1, *, split: str = "train", operations: tuple[str, ...] = OPERATIONS
) -> list[Problem]:
    """`n` problems drawn with `random.Random(seed)`: the same arguments always give the same list.

    Operations alternate evenly; operand pairs are drawn from `split` only (see `split_of`).
    """
    rng = random.Random(f"arithmetic:{seed}:{difficulty}:{split}")
    pools = {op: operand_pairs(op, difficulty, split) for op in operations}
    problems = []
    for i in range(n):
        op = operations[i % len(operations)]
        a, b = rng.choice(pools[op])
        problems.append(render_problem(op, a, b, rng))
    return problems


def extract_answer(text: str) -> str | None:
    """The number after the last "The answer is", or None when the text has no such phrase."""
    matches = ANSWER_PATTERN.findall(text)
    if not matches:
        return None
    return str(int(matches[-1]))  # int() drops leading zeros and a "-0"


def is_correct(completion: str, reference: str | int) -> bool:
    answer = extract_answer(completion)
    return answer is not None and answer == str(int(reference))


def used_wrong_operation(completion: str, problem: Problem) -> bool:
    """Whether the stated answer is what another operation gives on the problem's numbers (12 - 7 for 12 + 7):
    the mistake a sloppy annotator's demonstrations teach."""
    answer = extract_answer(completion)
    others = {compute(op, *problem.operands) for op in OPERATIONS if op != problem.operation} - {problem.answer}
    return answer is not None and int(answer) in others


# Share of rejected answers that are near misses (the rest use the wrong operation); see `wrong_answer`.
NEAR_MISS_SHARE = 0.75


def near_misses(problem: Problem) -> list[int]:
    """Wrong answers one step away in the table: the answers of neighbouring operand pairs.

    For + and -: the answer +-1 and +-2 ((a+1) + b, (a+1) + (b+1), ...). For x: the answer +-a and +-b
    (a x (b+1), (a-1) x b, ...). These are the mistakes a small model makes on operand pairs it has not seen: it
    answers with a neighbouring pair it has memorised (18 + 15 = 35, 8 x 3 = 27), not with a random number.
    """
    a, b = problem.operands
    steps = (a, -a, b, -b) if problem.operation == "x" else (1, -1, 2, -2)
    return sorted({problem.answer + step for step in steps if problem.answer + step >= 0} - {problem.answer})


def wrong_operation(problem: Problem, rng: random.Random) -> str | None:
    """The problem's numbers with another operation, shown honestly ("12 - 7 = 5. The answer is 5." for 12 + 7),
    or None when no other operation gives a different non-negative answer.

    The other operation's fact must not be held out unless the problem is: the rejected "9 x 7 = 63" of a training
    problem "9 + 7" would put a held-out fact (if 9 x 7 is held out) into the training data.
    """
    a, b = problem.operands
    heldout = split_of(problem.operation, a, b) == "heldout"
    ops = [op for op in OPERATIONS
           if op != problem.operation and compute(op, a, b) != problem.answer and compute(op, a, b) >= 0
           and (heldout or split_of(op, a, b) == "train")]
    if not ops:
        return None
    op = rng.choice(ops)
    return format_solution(op, a, b, compute(op, a, b))


def wrong_answer(problem: Problem, rng: random.Random, near_miss_share: float = NEAR_MISS_SHARE) -> tuple[str, str]:
    """A plausible wrong solution and its kind: ("near_miss", see `near_misses`) with probability
    `near_miss_share`, else ("wrong_operation", see `wrong_operation`); a near miss when no wrong operation exists."""
    wrong_op = wrong_operation(problem, rng) if rng.random() >= near_miss_share else None
    if wrong_op is not None:
        return wrong_op, "wrong_operation"
    # A near miss keeps the worked line's operands and operation and breaks only the result.
    a, b = problem.operands
    return format_solution(problem.operation, a, b, rng.choice(near_misses(problem))), "near_miss"


def as_pretraining_text(
    problems: list[Problem], *, seed: int = 0, filler_per_problem: float = 0.3, per_document: int = 8
) -> list[str]:
    """A raw-text corpus of the same world: problems and solutions as plain prose, with filler sentences.

    Problems are grouped `per_document` to a document (one per line, question then solution), with about
    `filler_per_problem` filler sentences mixed in per problem so the text is not only question-answer pairs.
    """
    rng = random.Random(f"arithmetic-text:{seed}")
    documents = []
    for start in range(0, len(problems), per_document):
        lines = []
        for p in problems[start : start + per_document]:
            lines.append(f"{p.question} {p.solution}")
            if rng.random() < filler_per_problem:
                lines.append(
                    rng.choice(FILLER).format(n=rng.choice(NAMES), o=rng.choice(OBJECTS), c=rng.choice(CONTAINERS))
                )
        documents.append("\n".join(lines))
    return documents


def as_chat_records(problems: list[Problem], *, wrong_operation_share: float = 0.0,
                    seed: int = 0) -> list[dict[str, Any]]:
    """`{"messages": [user, assistant]}` records for SFT.

    `wrong_operation_share` > 0 makes a sloppy annotator: that share of the answers use a wrong operation
    (`wrong_operation`, e.g. "12 - 7 = 5. The answer is 5." for 12 + 7), the rest are correct.
    """
    rng = random.Random(f"arithmetic-sloppy:{seed}")
    records = []
    for p in problems:
        messages = p.messages()
        if wrong_operation_share > 0 and rng.random() < wrong_operation_share:
            wrong = wrong_operation(p, rng)
            if wrong is not None:
                messages[-1] = {"role": "assistant", "content": wrong}
        records.append({"messages": messages})
    return records


def as_preference_records(problems: list[Problem], *, seed: int = 0,
                          near_miss_share: float = NEAR_MISS_SHARE) -> list[dict[str, Any]]:
    """`{"prompt": [user message], "chosen": correct solution, "rejected": a wrong one, "mistake": its kind}` for the
    reward-model and DPO stages (`mistake` is "near_miss" or "wrong_operation", see `wrong_answer`)."""
    rng = random.Random(f"arithmetic-pref:{seed}")
    records = []
    for p in problems:
        rejected, mistake = wrong_answer(p, rng, near_miss_share)
        records.append({"prompt": p.prompt_messages(), "chosen": p.solution, "rejected": rejected, "mistake": mistake})
    return records
