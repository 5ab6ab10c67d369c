"""Verifiable rewards: answer extraction in every form users write, comparison by value, the R1 format reward,
DAPO's overlong penalty, user functions by module or file, and clear errors for functions that misbehave."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest

from alignkit.errors import ConfigError
from alignkit.rewards.verifiable import (
    RewardError,
    accuracy,
    answers_match,
    extract_answer,
    load_reward_function,
    overlong_penalty,
    parse_number,
    r1_format,
    score_completions,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("so 3 + 4 = 7.\n#### 7", "7"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("The total is \\boxed{1,234} dollars", "1,234"),
    ("first \\boxed{2} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("<think>2 and 2</think><answer> 4 </answer>", "4"),
    ("12 - 7 = 5. The answer is 5.", "5."),
    ("I think it is -3.5 or maybe 12", "12"),
    ("no digits here", None),
])
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(("text", "value"), [
    ("1,234", Fraction(1234)), ("-3.50", Fraction(-7, 2)), ("+2", Fraction(2)), ("3/4", Fraction(3, 4)),
    ("$12", Fraction(12)), (".5", Fraction(1, 2)), ("5.", Fraction(5)), ("abc", None), ("1/0", None),
])
def test_parse_number_exact(text: str, value: Fraction | None) -> None:
    assert parse_number(text) == value


def test_answers_compare_by_value() -> None:
    assert answers_match("#### 1,000", 1000)
    assert answers_match("The answer is 0.50", "1/2")
    assert answers_match("\\boxed{-7}", "-7.0")
    assert not answers_match("#### 71", "72")
    assert not answers_match("nothing", "72")
    assert answers_match("<answer>Paris</answer>", "paris")  # not a number: compared as text


def test_builtin_rewards() -> None:
    completions = ["<think>3 x 4</think><answer>12</answer>", "the answer is 11", "<think>x</think> 12"]
    assert accuracy([""] * 3, completions, answer=["12", "12", None]) == [1.0, 0.0, None]
    assert r1_format([""] * 3, completions) == [1.0, 0.0, 0.0]
    with pytest.raises(RewardError, match="needs an `answer` field"):
        accuracy([""], ["1"])
    overlong = overlong_penalty(max_completion_length=10, cache=4)
    ids = [[0] * n for n in (3, 6, 8, 10, 12)]
    assert overlong([""] * 5, [""] * 5, completion_ids=ids) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ConfigError, match="cache"):
        overlong_penalty(max_completion_length=10, cache=0)


def test_user_functions_by_module_and_file(tmp_path: Path) -> None:
    assert load_reward_function("accuracy") is accuracy
    assert load_reward_function("alignkit.rewards.verifiable:r1_format") is r1_format
    source = tmp_path / "my_rewards.py"
    source.write_text("def short(prompts, completions, **kw):\n    return [-len(c) / 10 for c in completions]\n")
    short = load_reward_function(f"{source}:short")
    assert short(["p"], ["abcd"]) == [-0.4]
    for spec, message in ((f"{source}:missing", "has no function 'missing'"), ("nope.nothing:f", "cannot import"),
                          (f"{tmp_path / 'absent.py'}:f", "does not exist"), ("bleu", "not a built-in")):
        with pytest.raises(ConfigError, match=message):
            load_reward_function(spec)


def test_scores_combine_with_weights_and_none_means_not_applicable() -> None:
    completions = ["<think>a</think><answer>4</answer>", "4", "<think>b</think><answer>5</answer>", "x"]
    totals, values = score_completions([accuracy, r1_format], [1.0, 0.5], ["p"] * 4, completions,
                                       {"answer": ["4", "4", None, "4"]}, group_size=2)
    assert values["accuracy"][:2] == [1.0, 1.0] and math.isnan(values["accuracy"][2]) and values["accuracy"][3] == 0.0
    assert values["r1_format"] == [1.0, 0.0, 1.0, 0.0]
    assert totals == [1.5, 1.0, 0.5, 0.0]


def test_misbehaving_reward_functions_are_named() -> None:
    completions = ["fine", "also fine", "this one breaks the function"]

    def fragile(prompts: list, completions: list, **kw: object) -> list[float]:
        return [1.0 / (len(c) < 20) for c in completions]

    with pytest.raises(RewardError, match=r"'fragile' raised ZeroDivisionError.*completion 2 of prompt 1 "
                                          r"\(starting 'this one breaks"):
        score_completions([fragile], [1.0], ["p"] * 3, completions, {}, group_size=2)

    def short_list(prompts: list, completions: list, **kw: object) -> list[float]:
        return [1.0]

    def nan_reward(prompts: list, completions: list, **kw: object) -> list[float]:
        return [1.0, math.nan, 0.0]

    def text_reward(prompts: list, completions: list, **kw: object) -> list:
        return [1.0, "good", 0.0]

    with pytest.raises(RewardError, match="'short_list' returned 1 values for 3 completions"):
        score_completions([short_list], [1.0], ["p"] * 3, completions, {})
    with pytest.raises(RewardError, match=r"'nan_reward' returned nan for completion 1 of prompt 1"):
        score_completions([nan_reward], [1.0], ["p"] * 3, completions, {})
    with pytest.raises(RewardError, match=r"'text_reward' returned 'good'"):
        score_completions([text_reward], [1.0], ["p"] * 3, completions, {})
    with pytest.raises(ConfigError, match="2 reward functions but 1 weights"):
        score_completions([accuracy, r1_format], [1.0], [], [], {})
