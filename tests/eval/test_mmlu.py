"""MMLU: reading the CSVs, lm-evaluation-harness's exact prompt, the dev split as shots, per-subject and group
metrics (hand-computed), the shared prefix computed once, `alignkit eval --tasks mmlu` end to end, and bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from alignkit.checkpoint.hf import save_hf_model
from alignkit.cli import main
from alignkit.errors import ConfigError, DataError
from alignkit.eval.harness import TaskResult, evaluate_tasks, group_results, markdown_table, prepare
from alignkit.eval.loglikelihood import encode_pairs, plan_rows
from alignkit.eval.metrics import macro_mean_stderr, pooled_stderr
from alignkit.eval.mmlu import load_mmlu
from alignkit.eval.tasks import build_requests, fewshot_prefix, load_tasks
from tests.eval.icl_helpers import char_tokenizer, plain_loglikelihood, tiny_model

# Two subjects; the questions use only characters the one-character tokenizer knows.
DEV = {
    "astronomy": [["  What orbits the Earth? ", "Mars", "the Moon", "Venus", "the Sun", "B"],
                  ["Is the Sun a star?", "yes", "no", "both", "neither", "A"],
                  ["How many moons has Mars?", "0", "1", "2", "3", "C"]],
    "high_school_geography": [["Capital of France?", "Rome", "Paris", "Oslo", "Bern", "B"],
                              ["Longest river?", "Nile", "Seine", "Thames", "Po", "A"]],
}
TEST = {
    "astronomy": [["Closest star to Earth?", "Sirius", "Vega", "the Sun", "Rigel", "C"],
                  ["A comet has\na tail?", "no", "yes", "never", "sometimes", "B"],
                  ["Which planet is red, dusty, and cold?", "Mars", "Venus", "Earth", "Jupiter", "A"]],
    "high_school_geography": [["Largest ocean?", "Atlantic", "Indian", "Arctic", "Pacific", "D"],
                              ["Capital of Italy?", "Rome", "Milan", "Turin", "Pisa", "A"]],
}
VAL = {"astronomy": [["Red planet?", "Earth", "Mars", "Venus", "Pluto", "B"]],
       "high_school_geography": [["Capital of Spain?", "Lisbon", "Porto", "Madrid", "Rome", "C"]]}


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)  # no header row, as the MMLU files
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for split, rows in (("dev", DEV), ("test", TEST), ("val", VAL)):
        for subject, subject_rows in rows.items():
            write_csv(root / "mmlu" / split / f"{subject}_{split}.csv", subject_rows)
    return root


def test_one_shot_prompt_is_lm_evaluation_harness_s(data_dir: Path) -> None:
    [task] = load_mmlu("mmlu_astronomy", data_dir)
    pool, docs = prepare(task, [1])
    # Written out by hand from lm-eval's `_default_template_yaml` (question stripped, " " + letter after
    # "Answer:", "\n\n" after each shot) and `_generate_configs.py` (the description, underscores as spaces).
    expected = ("The following are multiple choice questions (with answers) about astronomy.\n\n"
                "What orbits the Earth?\nA. Mars\nB. the Moon\nC. Venus\nD. the Sun\nAnswer: B\n\n"
                "Closest star to Earth?\nA. Sirius\nB. Vega\nC. the Sun\nD. Rigel\nAnswer:")
    assert build_requests(docs[0], task.description + fewshot_prefix(pool, 1)) == [
        (expected, " A"), (expected, " B"), (expected, " C"), (expected, " D")]
    assert docs[0].gold == 2
    zero = build_requests(docs[2], task.description + fewshot_prefix(pool, 0))[0][0]
    assert zero == ("The following are multiple choice questions (with answers) about astronomy.\n\n"
                    "Which planet is red, dusty, and cold?\nA. Mars\nB. Venus\nC. Earth\nD. Jupiter\nAnswer:")
    [geo] = load_mmlu("mmlu_high_school_geography", data_dir)
    assert geo.description == ("The following are multiple choice questions (with answers) about high school "
                               "geography.\n\n")


def test_names_splits_and_lines(data_dir: Path) -> None:
    tasks = load_tasks("mmlu", data_dir)
    assert [t.name for t in tasks] == ["mmlu_astronomy", "mmlu_high_school_geography"]
    assert {t.group for t in tasks} == {"mmlu"} and all(t.path.parent.name == "test" for t in tasks)
    assert [len(t.docs) for t in tasks] == [3, 2] and [len(t.fewshot_docs or []) for t in tasks] == [3, 2]
    # The second astronomy question spans lines 2-3 (a quoted newline): a row's line is where it starts.
    assert [d.line for d in tasks[0].docs] == [1, 2, 4]
    assert tasks[0].docs[1].contexts[0].startswith("A comet has\na tail?\nA. no\n")
    val = load_tasks("mmlu:val", data_dir)
    assert [t.name for t in val] == ["mmlu_astronomy:val", "mmlu_high_school_geography:val"]
    assert {t.group for t in val} == {"mmlu:val"} and [len(t.docs) for t in val] == [1, 1]
    [one] = load_tasks("mmlu_high_school_geography:test", data_dir)
    assert one.name == "mmlu_high_school_geography" and one.describe() == {
        "path": str(data_dir / "mmlu" / "test" / "high_school_geography_test.csv"), "layout": "choices",
        "num_records": 2, "fewshot_path": str(data_dir / "mmlu" / "dev" / "high_school_geography_dev.csv"),
        "fewshot_records": 2, "group": "mmlu"}


def test_the_dev_split_is_the_shot_pool_and_limit_applies_per_subject(data_dir: Path) -> None:
    [astro, geo] = load_mmlu("mmlu", data_dir)
    pool, docs = prepare(astro, [0, 3], shot_pool=1, limit=2)  # --shot-pool does not apply to MMLU
    assert len(pool) == 3 and [d.index for d in docs] == [0, 1]
    with pytest.raises(ConfigError, match=r"mmlu_high_school_geography: 3 shots need 3 examples, but its few-shot "
                       r"file .*high_school_geography_dev.csv holds 2; ask for at most 2 shots"):
        prepare(geo, [0, 3])


def test_bad_input(data_dir: Path, tmp_path: Path) -> None:
    folder = data_dir / "mmlu"
    with pytest.raises(ConfigError, match="unknown MMLU subject 'anatomy' .*: astronomy, high_school_geography"):
        load_mmlu("mmlu_anatomy", data_dir)
    with pytest.raises(ConfigError, match="unknown MMLU split 'dev'"):
        load_mmlu("mmlu:dev", data_dir)
    with pytest.raises(ConfigError, match="does not exist. Set ALIGNKIT_SHARED_DATA or pass --data-dir"):
        load_mmlu("mmlu", tmp_path / "elsewhere")
    bad = write_csv(folder / "test" / "astronomy_test.csv", [*TEST["astronomy"], ["Q?", "a", "b", "c", "A"]])
    with pytest.raises(DataError, match=f"{bad}:5: an MMLU row needs 6 fields .* this one has 5"):
        load_mmlu("mmlu_astronomy", data_dir)
    write_csv(bad, [TEST["astronomy"][0], ["Q?", "a", "b", "c", "d", "E"]])
    with pytest.raises(DataError, match=f"{bad}:2: the answer is 'E'; it must be one of A, B, C, D.$"):
        load_mmlu("mmlu_astronomy", data_dir)
    write_csv(bad, [["question", "A", "B", "C", "D", "answer"], *TEST["astronomy"]])
    with pytest.raises(DataError, match=f"{bad}:1: the answer is 'answer'.* The files have no header row"):
        load_mmlu("mmlu_astronomy", data_dir)
    (folder / "dev" / "high_school_geography_dev.csv").unlink()
    with pytest.raises(DataError, match="high_school_geography_dev.csv: the dev file of MMLU subject "):
        load_mmlu("mmlu_high_school_geography", data_dir)
    for path in (folder / "val").iterdir():
        path.unlink()
    (folder / "val").rmdir()
    with pytest.raises(DataError, match=r"mmlu/val: the MMLU val split folder is missing"):
        load_mmlu("mmlu:val", data_dir)


def test_group_metrics_by_hand() -> None:
    # Subject a: items [1, 0]: acc 0.5, sample variance 0.5, stderr sqrt(0.5 / 2) = 0.5.
    # Subject b: items [1, 1, 1, 0]: acc 0.75, sample variance 0.25, stderr sqrt(0.25 / 4) = 0.25.
    assert macro_mean_stderr([0.5, 0.75], [0.5, 0.25]) == (0.625, pytest.approx(math.sqrt(0.25 + 0.0625) / 2))
    # Pooled: (1 x 0.5 + 3 x 0.25) / (6 - 2) = 0.3125; stderr sqrt(0.3125 / 6).
    assert pooled_stderr([0.5, 0.25], [2, 4]) == pytest.approx(math.sqrt(0.3125 / 6))
    assert math.isnan(pooled_stderr([math.nan, 0.25], [2, 4])) and pooled_stderr([math.nan, 0.25], [1, 4]) > 0
    results = [TaskResult("mmlu_a", 5, 2, {"acc": 0.5, "acc_stderr": 0.5}, group="mmlu"),
               TaskResult("mmlu_b", 5, 4, {"acc": 0.75, "acc_stderr": 0.25}, group="mmlu"),
               TaskResult("arc", 5, 9, {"acc": 0.1, "acc_stderr": 0.1})]
    [group] = group_results(results)
    assert (group.task, group.shots, group.num_items, group.subtasks) == ("mmlu", 5, 6, ["mmlu_a", "mmlu_b"])
    assert group.metrics == pytest.approx({"acc": 0.625, "acc_stderr": 0.2795085, "acc_micro": 4 / 6,
                                           "acc_micro_stderr": 0.2282177})
    table = markdown_table([group, *results])
    assert "| mmlu (2 tasks) | acc | 0.6250 ± 0.2795 | 6 |\n| mmlu (2 tasks) | acc_micro | 0.6667 ± 0.2282 | 6 |" \
        in table and "macro average" in table
    assert group_results(results[:1]) == []  # one subject: no group row


@pytest.fixture
def model_and_tokenizer():  # type: ignore[no-untyped-def]
    # A window that holds a 3-shot prompt: sequences cut on the left are scored alone, with no shared prefix.
    return tiny_model(max_position_embeddings=1024), char_tokenizer()


def test_scores_match_the_plain_scorer_and_the_shots_are_computed_once(
        data_dir: Path, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, tok = model_and_tokenizer
    tasks = load_mmlu("mmlu", data_dir)
    results = evaluate_tasks(model, tok, tasks, [0, 2], limit=2)
    assert [(r.task, r.shots) for r in results] == [
        ("mmlu", 0), ("mmlu", 2), ("mmlu_astronomy", 0), ("mmlu_astronomy", 2),
        ("mmlu_high_school_geography", 0), ("mmlu_high_school_geography", 2)]
    by_key = {(r.task, r.shots): r for r in results}
    for r in results[2:]:
        assert set(r.metrics) == {"acc", "acc_stderr"} and r.num_items == 2  # no acc_norm; --limit per subject
        for sample in r.samples:
            assert sample["choices"] == ["A", "B", "C", "D"]
            pairs = encode_pairs(tok, [(sample["prompt"], " " + c) for c in sample["choices"]])
            plain = [plain_loglikelihood(model, c, k)[0] for c, k in pairs]
            assert sample["loglikelihoods"] == pytest.approx(plain, abs=1e-5)
            assert sample["acc"] == float(plain.index(max(plain)) == sample["gold"])
        assert r.metrics["acc"] == sum(s["acc"] for s in r.samples) / 2
    for k in (0, 2):
        subjects = [by_key[("mmlu_astronomy", k)], by_key[("mmlu_high_school_geography", k)]]
        group = by_key[("mmlu", k)]
        assert group.metrics["acc"] == pytest.approx(sum(s.metrics["acc"] for s in subjects) / 2)
        items = [s["acc"] for r in subjects for s in r.samples]
        assert group.metrics["acc_micro"] == pytest.approx(sum(items) / len(items)) and group.num_items == 4
    # The description and the shots, the same for every item of a subject, are the prefix the scorer runs once.
    astro = tasks[0]
    pool, docs = prepare(astro, [3])
    prefix_text = astro.description + fewshot_prefix(pool, 3)
    requests = [encode_pairs(tok, build_requests(doc, prefix_text)) for doc in docs]
    prefix, rows = plan_rows(requests, window=model.config.max_position_embeddings)
    assert len(prefix) >= len(prefix_text) and len(rows) == len(docs)  # one token per character


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_hf_model(tiny_model(), tmp_path / "tiny", tokenizer=char_tokenizer())
    return tmp_path / "tiny"


def test_alignkit_eval_mmlu_writes_subjects_and_the_group(
        model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["eval", "--model", str(model_dir), "--tasks", "mmlu", "--shots", "0,1", "--limit", "2",
                 "--data-dir", str(data_dir), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["groups"] == {"mmlu": ["mmlu_astronomy", "mmlu_high_school_geography"]}
    assert list(data["results"]) == ["mmlu", "mmlu_astronomy", "mmlu_high_school_geography"]
    group = data["results"]["mmlu"]["1"]
    assert set(group) == {"acc", "acc_stderr", "acc_micro", "acc_micro_stderr", "n", "num_tasks", "elapsed_s"}
    assert (group["n"], group["num_tasks"]) == (4, 2)
    subjects = [data["results"][t]["1"]["acc"] for t in ("mmlu_astronomy", "mmlu_high_school_geography")]
    assert group["acc"] == pytest.approx(sum(subjects) / 2)
    assert data["tasks"]["mmlu_astronomy"]["fewshot_path"].endswith("astronomy_dev.csv")
    assert "| mmlu (2 tasks) | acc_micro |" in printed and printed in (out / "results.md").read_text()
    samples = (out / "samples_mmlu_astronomy_1shot.jsonl").read_text().splitlines()
    assert len(samples) == 2 and json.loads(samples[0])["prompt"].startswith(
        "The following are multiple choice questions (with answers) about astronomy.\n\nWhat orbits the Earth?")
    assert not (out / "samples_mmlu_1shot.jsonl").exists()


def test_alignkit_eval_mmlu_errors_are_one_line(model_dir: Path, data_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    base = ["eval", "--model", str(model_dir), "--data-dir", str(data_dir), "--output", str(tmp_path / "o")]
    for argv, message in (
        (["--tasks", "mmlu_nope"], "unknown MMLU subject 'nope'"),
        (["--tasks", "mmlu", "--shots", "5"], "5 shots need 5 examples"),
    ):
        assert main([*base, *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("alignkit eval: error: ") and message in lines[-1]
        assert not any("Traceback" in line for line in lines) and not any(line.startswith("loading") for line in lines)


@pytest.mark.slow
def test_smollm2_on_two_real_subjects(smollm2_gguf: str, shared_data: Path, tmp_path: Path) -> None:
    """Two subjects of the real MMLU, 10 questions each, 5 shots: the first prompt is lm-evaluation-harness's, the
    packed scores equal a plain forward per choice, and the description and shots are the prefix computed once."""
    if not (shared_data / "mmlu" / "test").is_dir():
        pytest.skip(f"no mmlu/ folder in {shared_data}")
    import alignkit

    model, tok = alignkit.load(smollm2_gguf)
    assert tok is not None
    tasks = load_mmlu("mmlu_abstract_algebra", shared_data) + load_mmlu("mmlu_astronomy", shared_data)
    results = evaluate_tasks(model, tok, tasks, [5], limit=10)
    assert [(r.task, r.num_items) for r in results] == [("mmlu", 20), ("mmlu_abstract_algebra", 10),
                                                        ("mmlu_astronomy", 10)]
    first = results[1].samples[0]
    assert first["prompt"].startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n")
    assert first["prompt"].endswith(
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:") and first["gold"] == 1
    for r in results[1:]:
        for sample in r.samples[:1]:
            pairs = encode_pairs(tok, [(sample["prompt"], " " + c) for c in "ABCD"])
            assert all(len(k) == 1 for _, k in pairs)  # " A" ... " D" are one token each
            plain = [plain_loglikelihood(model, c, k)[0] for c, k in pairs]
            assert sample["loglikelihoods"] == pytest.approx(plain, abs=1e-4)
    group = results[0].metrics
    assert group["acc"] == pytest.approx((results[1].metrics["acc"] + results[2].metrics["acc"]) / 2)
    pool, docs = prepare(tasks[0], [5], limit=10)
    shots = tasks[0].description + fewshot_prefix(pool, 5)
    prefix, _ = plan_rows([encode_pairs(tok, build_requests(doc, shots)) for doc in docs],
                          window=model.config.max_position_embeddings)
    assert len(prefix) >= len(tok.encode(shots.rstrip()))
