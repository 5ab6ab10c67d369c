"""Word problems from the shared MAWPS-family files: clean answers, unmasked numbers, a fixed disjoint split, and
held-out accuracy through the chat template with GRPO's answer check."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from alignkit.errors import DataError
from alignkit.eval import verifiable as V
from alignkit.generation import Completion, SamplingParams
from alignkit.tasks import word_problems as W


@pytest.mark.parametrize(("value", "text"), [(504.0, "504"), (2.5, "2.5"), ("43", "43"), ("39.0", "39"), (0.1, "0.1"),
                                             ("1,000", "1000"), (-3.0, "-3"), (0.16666666666666666, "0.16666666666666666")])
def test_format_number(value: float | str, text: str) -> None:
    assert W.format_number(value) == text


def test_format_number_refuses_text() -> None:
    with pytest.raises(DataError, match="'seven' is not a number"):
        W.format_number("seven")


def test_unmask_puts_the_numbers_back() -> None:
    """The README's example record, and a tenth placeholder that must not be read as number1 followed by 0."""
    question = ("Bryan took a look at his books as well . If Bryan has number0 books in each of his number1 bookshelves "
                ", how many books does he have in total ?")
    assert W.clean_text(W.unmask(question, "56.0 9.0")) == (
        "Bryan took a look at his books as well. If Bryan has 56 books in each of his 9 bookshelves, how many books "
        "does he have in total?")
    assert W.unmask("number10 and number1", " ".join(f"{i}.0" for i in range(11))) == "10 and 1"
    assert W.unmask("costs number0 dollars", "2.5") == "costs 2.5 dollars"
    with pytest.raises(DataError, match="number2 has no value among the 2 numbers"):
        W.unmask("number2 apples", "1.0 2.0")


def test_clean_text_reattaches_punctuation() -> None:
    assert W.clean_text(" Joan 's  cat did n't eat $ 5 of food , or 10 % ?  ") == "Joan's cat didn't eat $5 of food, or 10%?"


def test_merge_drops_copies_conflicts_and_long_decimals() -> None:
    records = [
        {"question": "Tom has 3 apples. How many?", "answer": "3", "source": "a"},
        {"question": "tom has 3 apples , how many ?", "answer": "3", "source": "b"},  # a copy: merged into the first
        {"question": "Ann has 5 pears. How many?", "answer": "5", "source": "a"},
        {"question": "Ann has 5 pears, how many?", "answer": "6", "source": "b"},  # disagrees: both dropped
        {"question": "Split 1 cake in 6. How much each?", "answer": "0.16666666666666666", "source": "a"},
        {"question": "A rope of 0.125 m. How long?", "answer": "0.13", "source": "a"},  # a number with 3 decimals
        {"question": "A rope of 2.25 m and 1.5 m. Total?", "answer": "3.75", "source": "a"},
    ]
    problems, counts = W.merge(records)
    assert [(p["question"], p["source"]) for p in problems] == [
        ("Tom has 3 apples. How many?", "a"), ("A rope of 2.25 m and 1.5 m. Total?", "a")]
    assert counts == {"read": 7, "too_many_decimals": 2, "copies": 1, "conflicting_answers": 2, "kept": 2}


def test_near_copies_share_a_split() -> None:
    """AddSub and SingleEq word the same problem differently; the split key ignores the wording."""
    addsub = {"question": "Joan found 70 seashells on the beach. she gave Sam some of her seashells. She has 27 "
              "seashell. How many seashells did she give to Sam?", "answer": "43"}
    singleeq = {"question": "Joan found 70 seashells on the beach. she gave Sam some of her seashells. She has 27 "
                "seashell left. How many seashells did she give to Sam ?", "answer": "43"}
    assert W.normalise(addsub["question"]) != W.normalise(singleeq["question"])
    assert W.split_key(addsub) == W.split_key(singleeq) == "27 70 -> 43"
    assert W.split_of(addsub) == W.split_of(singleeq)


def test_split_is_pinned() -> None:
    """The split never moves: these records' sides are fixed (crc32 of the key, not Python's salted hash)."""
    sides = {key: W.split_of({"question": q, "answer": a})
             for key, (q, a) in {"bryan": ("56 books on each of 9 shelves", "504"),
                                 "debby": ("32 and 42 candies, ate 35", "39"),
                                 "joan": ("70 shells, has 27", "43")}.items()}
    assert sides == {"bryan": "train", "debby": "eval", "joan": "eval"}


def test_word_problem_prompt_and_reference() -> None:
    problem = W.WordProblem("How many?", "504")
    assert problem.reference == "504"
    assert problem.prompt_messages() == [{"role": "system", "content": W.SYSTEM_PROMPT},
                                         {"role": "user", "content": "How many?"}]
    assert W.WordProblem("How many?", "504", system_prompt=None).prompt_messages() == [
        {"role": "user", "content": "How many?"}]


def test_stated_answer_rewards_one_final_statement() -> None:
    replies = ["12 + 7 = 19. The answer is 19.", "The answer is: 1,000", "the answer is $4.50 !",
               "The answer is 7.\nThe answer is 7.", "The answer is 19. So Tom has 19 apples.", "So 19 apples.",
               "The answer is N, which is the final number.", "The answer is 12 + 7"]
    assert W.stated_answer([None] * 8, replies) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


class RecordingTokenizer:
    """Gives each distinct message list one token id, so a fake generator can look the prompt up."""

    def __init__(self) -> None:
        self.prompts: list[list[dict[str, str]]] = []

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> SimpleNamespace:
        assert add_generation_prompt
        self.prompts.append(messages)
        return SimpleNamespace(input_ids=[len(self.prompts) - 1])


def test_evaluate_checks_answers_by_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies in the forms the GRPO reward reads (####, \\boxed, "The answer is", last number); 3 of 5 right."""
    records = [{"question": f"Q{i}", "answer": answer} for i, answer in enumerate(["504", "2.5", "39", "7", "12"])]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    replies = ["56 * 9 = 504\n#### 504", "So \\boxed{2.50}", "The answer is 40.", "3 pears and 7 apples", "12 - 1 = 11"]
    tokenizer = RecordingTokenizer()
    seen: list[SamplingParams] = []

    def fake_generate(model: object, prompts: list[list[int]], params: SamplingParams, *, tokenizer: Any):
        seen.append(params)
        return [Completion(i, [], [], [], "stop", replies[int(tokenizer.prompts[p[0]][-1]["content"][1:])])
                for i, p in enumerate(prompts)]

    import alignkit

    monkeypatch.setattr(alignkit, "load", lambda path: (object(), tokenizer))
    monkeypatch.setattr(V, "generate", fake_generate)
    result = W.evaluate("some-model", eval_file, max_new_tokens=17, batch_size=2, num_examples=10)
    assert (result["num"], result["num_correct"]) == (5, 3) and result["accuracy"] == pytest.approx(0.6)
    assert [e["correct"] for e in result["examples"]] == [True, True, False, True, False]
    assert all(p.temperature == 0 and p.max_new_tokens == 17 for p in seen) and len(seen) == 3
    assert tokenizer.prompts[0] == [{"role": "system", "content": W.SYSTEM_PROMPT}, {"role": "user", "content": "Q0"}]


def test_read_problems_reads_gsm8k_answers_and_names_a_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text('{"question": "Q", "answer": "1"}\n{"question": "Q1", "answer": "48 / 2 = 24\\n#### 1,024"}\n')
    assert [(p.question, p.reference) for p in W.read_problems(path)] == [("Q", "1"), ("Q1", "1024")]
    path.write_text('{"question": "Q", "answer": "1"}\n{"question": "Q2"}\n')
    with pytest.raises(DataError, match=r"record 1 of .*eval.jsonl has no 'answer' field"):
        W.read_problems(path)


def test_missing_data_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert W.main(["--out", str(tmp_path / "out"), "--data", str(tmp_path)]) == 2
    assert "multiarith/MultiArith.json does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# On the shared data files (skipped when they are absent)


def test_readers_match_hand_checked_records(shared_data: Path) -> None:
    mawps = W.read_mawps_asdiv_a(shared_data / W.SOURCES["mawps_asdiv_a"])
    assert len(mawps) == 3138
    assert mawps[0] == {"question": "Bryan took a look at his books as well. If Bryan has 56 books in each of his 9 "
                        "bookshelves, how many books does he have in total?", "answer": "504",
                        "source": "mawps_asdiv_a"}
    assert mawps[2]["question"].startswith("There are 41 short trees and 44 tall trees") and mawps[2]["answer"] == "98"
    assert not any("number0" in r["question"] for r in mawps)
    multiarith = W.read_solutions_json(shared_data / W.SOURCES["multiarith"], "multiarith")
    assert len(multiarith) == 600 and multiarith[0]["answer"] == "39"
    assert multiarith[0]["question"].startswith("For Halloween Debby and her sister combined the candy they received.")
    addsub = W.read_solutions_json(shared_data / W.SOURCES["addsub"], "addsub")
    assert len(addsub) == 395 and addsub[0] == {
        "question": "Joan found 70 seashells on the beach. she gave Sam some of her seashells. She has 27 seashell. "
        "How many seashells did she give to Sam?", "answer": "43", "source": "addsub"}
    singleeq = W.read_solutions_json(shared_data / W.SOURCES["singleeq"], "singleeq")
    assert len(singleeq) == 508 and singleeq[0]["answer"] == "43"


def test_splits_are_deterministic_and_disjoint(shared_data: Path, tmp_path: Path) -> None:
    counts = W.write_splits(tmp_path, shared_data)
    assert counts == {"read": 4641, "too_many_decimals": 173, "copies": 1664, "conflicting_answers": 15,
                      "kept": 2789, "train": 2494, "eval": 295}
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert (len(train), len(held_out)) == (2494, 295)
    again_train, again_eval, _ = W.load_splits(shared_data)
    assert (again_train, again_eval) == (train, held_out)
    # Disjoint by wording and by numbers + answer; no copies within a split.
    assert not {W.normalise(r["question"]) for r in train} & {W.normalise(r["question"]) for r in held_out}
    assert not {W.split_key(r) for r in train} & {W.split_key(r) for r in held_out}
    assert len({W.normalise(r["question"]) for r in train}) == len(train)
    # Every held-out set contributes; answers are clean number strings.
    assert {r["source"] for r in held_out} == set(W.SOURCES)
    for record in train + held_out:
        assert record["answer"] == W.format_number(record["answer"]) and W.decimals(record["answer"]) <= 2
        assert "number0" not in record["question"] and " ," not in record["question"]
