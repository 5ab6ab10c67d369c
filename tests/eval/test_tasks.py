"""Few-shot tasks: the three JSONL layouts, exact prompts for 0, 1 and k shots, the shot pool, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.errors import ConfigError, DataError
from alignkit.eval.harness import prepare
from alignkit.eval.tasks import build_requests, fewshot_prefix, known_tasks, load_task, resolve_task
from tests.eval.icl_helpers import CHOICE_RECORDS, CONTINUATION_RECORDS, PARTIAL_RECORDS, write_jsonl


@pytest.fixture
def choice_task(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", CHOICE_RECORDS)


def test_layouts_are_recognised_by_their_fields(tmp_path: Path) -> None:
    assert load_task(str(write_jsonl(tmp_path / "a.jsonl", CHOICE_RECORDS))).layout == "choices"
    assert load_task(str(write_jsonl(tmp_path / "b.jsonl", PARTIAL_RECORDS))).layout == "partial"
    task = load_task(str(write_jsonl(tmp_path / "c.jsonl", CONTINUATION_RECORDS)))
    assert (task.layout, task.name, len(task.docs)) == ("continuation", "c", 4)
    assert task.docs[2].gold is None and task.docs[2].line == 3


def test_prompts_for_zero_one_and_k_shots_are_exact(choice_task: Path) -> None:
    task = load_task(str(choice_task))
    pool, docs = task.split(2)
    item = docs[0]  # the third record: "Question: 2+2?" with choices 5 / 4 / 22
    assert build_requests(item, fewshot_prefix(pool, 0)) == [
        ("Question: 2+2?", " 5"), ("Question: 2+2?", " 4"), ("Question: 2+2?", " 22")]
    one = "Question: 1+1? 2\n\nQuestion: 2+2?"
    assert [c for c, _ in build_requests(item, fewshot_prefix(pool, 1))] == [one] * 3
    two = "Question: 1+1? 2\n\nQuestion: sky? blue\n\nQuestion: 2+2?"
    assert build_requests(item, fewshot_prefix(pool, 2))[1] == (two, " 4")


def test_partial_scoring_puts_each_option_in_the_context(tmp_path: Path) -> None:
    task = load_task(str(write_jsonl(tmp_path / "wino.jsonl", PARTIAL_RECORDS)))
    pool, docs = task.split(1)
    prefix = fewshot_prefix(pool, 1)
    # The shot is the gold option followed by the continuation.
    assert prefix == "Ann gave Bo a gift because Ann was generous.\n\n"
    assert build_requests(docs[0], prefix) == [
        (prefix + "Cy thanked Di because Cy", " had helped."),
        (prefix + "Cy thanked Di because Di", " had helped."),
    ]


def test_lambada_layout_scores_the_continuation_after_a_space(tmp_path: Path) -> None:
    task = load_task(str(write_jsonl(tmp_path / "lambada.jsonl", CONTINUATION_RECORDS)))
    pool, docs = task.split(1)
    assert build_requests(docs[0], fewshot_prefix(pool, 1)) == [
        ("the cat sat on the mat\n\none two three four", " five")]


def test_shot_pool_is_the_head_of_the_file_and_never_scored(choice_task: Path) -> None:
    task = load_task(str(choice_task))
    pool, docs = prepare(task, [0, 1, 5])
    assert [d.index for d in pool] == [0, 1, 2, 3, 4] and [d.index for d in docs] == [5]
    # A fixed pool keeps the scored records the same whatever the shot counts; --limit cuts after the pool.
    pool, docs = prepare(task, [0], shot_pool=2, limit=3)
    assert [d.index for d in pool] == [0, 1] and [d.index for d in docs] == [2, 3, 4]


def test_known_task_names_resolve_in_the_data_folder(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "icl_eval"
    folder.mkdir(parents=True)
    write_jsonl(folder / "qa.jsonl", CHOICE_RECORDS)
    assert list(known_tasks(tmp_path / "data")) == ["qa"]
    assert resolve_task("qa", tmp_path / "data") == ("qa", folder / "qa.jsonl")


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CHOICE_RECORDS[0]) + "\n\n" + '{"query": "x", "choices": ["a", "b"],\n')
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        load_task(str(path))


def test_gold_out_of_range_names_file_line_and_field(tmp_path: Path) -> None:
    records = [*CHOICE_RECORDS[:2], {"query": "q", "choices": ["a", "b"], "gold": 2}]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    with pytest.raises(DataError, match=rf"{path}:3: 'gold' is 2, out of range for 2 choices \(0 to 1\)"):
        load_task(str(path))
    path = write_jsonl(tmp_path / "w.jsonl", [{**PARTIAL_RECORDS[0], "gold": -1}])
    with pytest.raises(DataError, match=rf"{path}:1: 'gold' is -1, out of range for 2 context_options"):
        load_task(str(path))
    path = write_jsonl(tmp_path / "s.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": "0"}])
    with pytest.raises(DataError, match=rf"{path}:1: 'gold' must be an integer"):
        load_task(str(path))


def test_empty_choices_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [CHOICE_RECORDS[0], {"query": "q", "choices": [], "gold": 0}])
    with pytest.raises(DataError, match=rf"{path}:2: 'choices' has 0 entries"):
        load_task(str(path))


def test_a_record_that_does_not_fit_the_layout_names_the_missing_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [CHOICE_RECORDS[0], {"query": "q", "gold": 0}])
    with pytest.raises(DataError, match=rf"{path}:2: missing 'choices'"):
        load_task(str(path))
    path = write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"needs one of these sets of fields"):
        load_task(str(path))


def test_more_shots_than_the_pool_holds(choice_task: Path) -> None:
    task = load_task(str(choice_task))
    with pytest.raises(ConfigError, match="3 shots need 3 examples, but the shot pool holds 2"):
        prepare(task, [0, 3], shot_pool=2)


def test_a_pool_as_large_as_the_file_leaves_nothing_to_score(choice_task: Path) -> None:
    task = load_task(str(choice_task))
    with pytest.raises(ConfigError, match=r"shot pool of 6 records leaves nothing to score: the file has 6"):
        prepare(task, [6])


def test_unknown_task_name_lists_the_known_ones(tmp_path: Path) -> None:
    folder = tmp_path / "icl_eval"
    folder.mkdir()
    write_jsonl(folder / "arc_easy.jsonl", CHOICE_RECORDS)
    write_jsonl(folder / "copa.jsonl", CHOICE_RECORDS)
    with pytest.raises(ConfigError, match=r"unknown task 'arc_hard'; known tasks .*: arc_easy, copa"):
        load_task("arc_hard", tmp_path)
    with pytest.raises(DataError, match=r"task file missing/file.jsonl does not exist"):
        load_task("missing/file.jsonl", tmp_path)


# ------------------------------------------------------------------------------------------------ real files


def test_every_shared_task_file_loads_in_its_layout(shared_data: Path) -> None:
    known = known_tasks(shared_data)
    if not known:
        pytest.skip(f"no icl_eval folder in {shared_data}")
    layouts = {name: load_task(name, shared_data).layout for name in known}
    expected = {"winogrande": "partial", "lambada_openai": "continuation", "arc_easy": "choices",
                "arc_challenge": "choices", "boolq": "choices", "piqa": "choices", "copa": "choices",
                "commonsense_qa": "choices"}
    assert {n: layouts[n] for n in expected if n in layouts} == {n: v for n, v in expected.items() if n in layouts}
