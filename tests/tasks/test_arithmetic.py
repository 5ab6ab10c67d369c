"""The arithmetic task: answers right by construction, a fixed train/held-out split, deterministic generation."""

from __future__ import annotations

import re

import pytest

from alignkit.tasks import arithmetic as A


def _recompute(problem: A.Problem) -> int:
    """Independent of `compute`: read the operands back out of the question text and apply Python's operators."""
    numbers = [int(n) for n in re.findall(r"\d+", problem.question)]
    a, b = numbers
    return {"+": a + b, "-": a - b, "x": a * b}[problem.operation]


@pytest.mark.parametrize("difficulty", [1, 2, 3])
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_answers_are_correct_by_construction(difficulty: int, split: str) -> None:
    for p in A.make_problems(300, seed=3, difficulty=difficulty, split=split):
        assert p.answer == _recompute(p)
        a, b = p.operands
        assert p.solution == f"{a} {p.operation} {b} = {p.answer}. The answer is {p.answer}."
        assert A.extract_answer(p.solution) == str(p.answer)
        assert A.is_correct(p.solution, p.reference)
        assert p.answer >= 0


def test_operations_alternate_evenly() -> None:
    ops = [p.operation for p in A.make_problems(9, seed=0)]
    assert ops == ["+", "-", "x"] * 3


def test_deterministic_by_seed() -> None:
    assert A.make_problems(50, seed=1) == A.make_problems(50, seed=1)
    assert A.make_problems(50, seed=1) != A.make_problems(50, seed=2)
    assert A.as_pretraining_text(A.make_problems(20), seed=4) == A.as_pretraining_text(A.make_problems(20), seed=4)


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_train_and_heldout_pairs_are_disjoint(difficulty: int) -> None:
    for op in A.OPERATIONS:
        train = set(A.operand_pairs(op, difficulty, "train"))
        held = set(A.operand_pairs(op, difficulty, "heldout"))
        assert held and train and not train & held
        # Together they cover every pair in range.
        lo, hi = A.OPERAND_RANGES[difficulty][op]
        total = (hi - lo + 1) ** 2 if op != "-" else sum(a - 1 for a in range(lo, hi + 1))
        assert len(train) + len(held) == total
        if op in ("+", "x"):
            # Every held-out commutative pair is trained on in the other order.
            assert all((b, a) in train for a, b in held)
    # Problems drawn from each split use only that split's pairs, whatever the seed.
    for seed in range(3):
        for p in A.make_problems(200, seed=seed, difficulty=difficulty, split="heldout"):
            assert A.split_of(p.operation, *p.operands) == "heldout"


def test_split_is_pinned() -> None:
    """The split is a fixed crc32 hash; these pairs were read off once and must never move between versions."""
    assert A.operand_pairs("x", 1, "heldout") == [(3, 2), (7, 4), (8, 3), (8, 4), (9, 7)]
    assert A.operand_pairs("-", 1, "heldout")[:4] == [(5, 4), (10, 6), (11, 2), (11, 8)]
    assert len(A.operand_pairs("x", 1, "train")) == 59
    assert len(A.operand_pairs("+", 1, "heldout")) == 21
    assert len(A.operand_pairs("-", 1, "heldout")) == 18


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12 + 7 = 19. The answer is 19.", "19"),
        ("the answer is 5", "5"),
        ("The answer is 3. No wait, the answer is 4.", "4"),  # the last one counts
        ("The answer is 007.", "7"),
        ("The answer is -2.", "-2"),
        ("12 + 7 = 19.", None),
        ("The answer is nineteen.", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert A.extract_answer(text) == expected


def test_is_correct() -> None:
    assert A.is_correct("3 x 4 = 12. The answer is 12.", "12")
    assert A.is_correct("The answer is 12", 12)
    assert not A.is_correct("The answer is 13.", "12")
    assert not A.is_correct("3 x 4 = 12.", "12")  # no final answer phrase


def test_records() -> None:
    problems = A.make_problems(30, seed=0)
    chat = A.as_chat_records(problems)
    assert chat[0] == {
        "messages": [
            {"role": "user", "content": problems[0].question},
            {"role": "assistant", "content": problems[0].solution},
        ]
    }
    prefs = A.as_preference_records(problems, seed=0)
    for p, rec in zip(problems, prefs):
        assert rec["prompt"] == [{"role": "user", "content": p.question}]
        assert rec["chosen"] == p.solution
        assert A.is_correct(rec["chosen"], p.reference)
        assert not A.is_correct(rec["rejected"], p.reference)
        wrong = int(A.extract_answer(rec["rejected"]) or "0")
        a, b = p.operands
        if rec["mistake"] == "near_miss":  # same worked line, a neighbouring pair's answer
            assert rec["rejected"].startswith(f"{a} {p.operation} {b} = ")
            steps = {a, b} if p.operation == "x" else {1, 2}
            assert abs(wrong - p.answer) in steps
        else:
            assert rec["mistake"] == "wrong_operation"
            op = rec["rejected"].split()[1]
            assert op != p.operation and wrong == A.compute(op, a, b)
    assert A.as_preference_records(problems, seed=0) == prefs  # seeded
    assert A.as_preference_records(problems, seed=1) != prefs
    text = A.as_pretraining_text(problems, per_document=10)
    assert len(text) == 3
    joined = "\n".join(text)
    assert all(f"{p.question} {p.solution}" in joined for p in problems)


def test_near_misses_and_mistake_mix() -> None:
    plus = A.Problem("q", "18 + 15 = 33. The answer is 33.", 33, "+", (18, 15))
    assert A.near_misses(plus) == [31, 32, 34, 35]  # 18 + 13 .. 18 + 17: what a model recalls for an unseen pair
    times = A.Problem("q", "8 x 3 = 24. The answer is 24.", 24, "x", (8, 3))
    assert A.near_misses(times) == [16, 21, 27, 32]  # 8 x 2, 7 x 3, 9 x 3, 8 x 4
    minus = A.Problem("q", "3 - 2 = 1. The answer is 1.", 1, "-", (3, 2))
    assert A.near_misses(minus) == [0, 2, 3]  # never negative
    # Three in four rejected answers are near misses, the rest use the wrong operation.
    records = A.as_preference_records(A.make_problems(2000, seed=5), seed=0)
    share = sum(r["mistake"] == "near_miss" for r in records) / len(records)
    assert abs(share - A.NEAR_MISS_SHARE) < 0.03


def test_wrong_operations_of_training_problems_are_training_facts() -> None:
    """A rejected "a op b = c" of a training problem is itself a training fact, so held-out facts never reach the
    training data (a held-out problem may show any fact: it is only evaluated)."""
    pattern = re.compile(r"^(\d+) ([+x-]) (\d+) = (\d+)\.")
    records = A.as_preference_records(A.make_problems(1500, seed=3), seed=4, near_miss_share=0.0)
    wrong_ops = [r for r in records if r["mistake"] == "wrong_operation"]
    assert len(wrong_ops) > 1200  # near misses only where no other operation gives a new non-negative answer
    for record in wrong_ops:
        a, op, b, c = pattern.match(record["rejected"]).groups()  # type: ignore[union-attr]
        assert A.split_of(op, int(a), int(b)) == "train", record
        assert A.compute(op, int(a), int(b)) == int(c) and op not in record["chosen"].split("=")[0]


def test_sloppy_chat_records_use_a_wrong_operation_at_the_given_rate() -> None:
    problems = A.make_problems(3000, seed=1)
    clean = A.as_chat_records(problems)
    assert all(r["messages"][-1]["content"] == p.solution for r, p in zip(clean, problems))
    sloppy = A.as_chat_records(problems, wrong_operation_share=0.3, seed=0)
    wrong = [(r, p) for r, p in zip(sloppy, problems) if r["messages"][-1]["content"] != p.solution]
    # A few problems have no other operation with a new non-negative answer (e.g. 2 + 2 = 2 x 2).
    assert 0.27 < len(wrong) / len(problems) <= 0.3 + 0.02
    for record, problem in wrong:
        text = record["messages"][-1]["content"]
        assert not A.is_correct(text, problem.reference)
        assert text.split(" ")[1] != problem.operation  # the operation is what is wrong
    assert A.as_chat_records(problems, wrong_operation_share=0.3, seed=0) == sloppy  # deterministic


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="difficulty"):
        A.make_problems(1, difficulty=9)
    with pytest.raises(ValueError, match="split"):
        A.make_problems(1, split="test")
