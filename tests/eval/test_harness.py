"""The few-shot harness: metrics from the scores (hand-computed), each layout against the plain scorer, the same
records at every shot count, and the outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignkit.eval import harness
from alignkit.eval.harness import TaskResult, evaluate_task, markdown_table, write_outputs
from alignkit.eval.loglikelihood import Score, encode_pairs
from alignkit.eval.tasks import load_task
from tests.eval.icl_helpers import (
    CHOICE_RECORDS,
    CONTINUATION_RECORDS,
    PARTIAL_RECORDS,
    char_tokenizer,
    plain_loglikelihood,
    tiny_model,
    write_jsonl,
)


def test_acc_acc_norm_and_stderr_from_fixed_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = load_task(str(write_jsonl(tmp_path / "qa.jsonl", CHOICE_RECORDS)))
    # Items 0-3 (no shot pool): choices ["2","3","11"] gold 0, ["blue","green"] 0, ["5","4","22"] 1, ["moo","meow"] 1.
    fixed = [[-1.0, -2.0, -1.5], [-5.0, -4.0], [-3.0, -1.0, -2.0], [-2.0, -3.0]]
    monkeypatch.setattr(harness, "score_requests", lambda model, requests, **_: [
        [Score(ll, False, 1) for ll in lls] for lls in fixed[: len(requests)]])
    [result] = evaluate_task(None, char_tokenizer(), task, [0], limit=4)  # type: ignore[arg-type]
    # acc:      argmax -> 0 (right), 1 (wrong), 1 (right), 0 (wrong)                       = 2/4
    # acc_norm: /len   -> [-1, -2, -0.75] -> 2 (wrong); [-1.25, -0.8] -> 1 (wrong);
    #                     [-3, -1, -1] -> 1 (right, first of a tie); [-0.667, -0.75] -> 0 (wrong) = 1/4
    assert result.metrics["acc"] == 0.5
    assert result.metrics["acc_stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 3))
    assert result.metrics["acc_norm"] == 0.25
    assert result.metrics["acc_norm_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 3))
    assert [s["prediction_norm"] for s in result.samples] == [2, 1, 1, 0]


@pytest.fixture(scope="module")
def model_and_tokenizer():  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    return tiny_model(), char_tokenizer()


def _check_samples_against_plain(model, tokenizer, result: TaskResult) -> None:  # type: ignore[no-untyped-def]
    for sample in result.samples:
        prompts = sample["prompt"] if isinstance(sample["prompt"], list) else [sample["prompt"]]
        if "choices" in sample and isinstance(sample["prompt"], str):
            pairs = [(prompts[0], " " + c) for c in sample["choices"]]
        else:
            pairs = [(p, " " + sample["continuation"]) for p in prompts]
        lls = [plain_loglikelihood(model, c, k)[0] for c, k in encode_pairs(tokenizer, pairs)]
        got = sample["loglikelihoods"] if "loglikelihoods" in sample else [sample["loglikelihood"]]
        assert got == pytest.approx(lls, abs=1e-5)


def test_choice_task_matches_the_plain_scorer_at_every_shot_count(tmp_path: Path, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, tok = model_and_tokenizer
    task = load_task(str(write_jsonl(tmp_path / "qa.jsonl", CHOICE_RECORDS)))
    results = evaluate_task(model, tok, task, [2, 0, 1])
    assert [r.shots for r in results] == [0, 1, 2]
    for r in results:
        assert [s["index"] for s in r.samples] == [2, 3, 4, 5]  # the same records at every shot count
        _check_samples_against_plain(model, tok, r)
        assert r.metrics["acc"] == sum(s["prediction"] == s["gold"] for s in r.samples) / 4
    assert results[2].samples[0]["prompt"] == "Question: 1+1? 2\n\nQuestion: sky? blue\n\nQuestion: 2+2?"


def test_winogrande_partial_scoring_scores_the_continuation_after_each_option(
        tmp_path: Path, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, tok = model_and_tokenizer
    task = load_task(str(write_jsonl(tmp_path / "wino.jsonl", PARTIAL_RECORDS)))
    [zero, one] = evaluate_task(model, tok, task, [0, 1])
    assert set(zero.metrics) == {"acc", "acc_stderr"}  # every option scores the same continuation: no acc_norm
    sample = one.samples[0]
    assert sample["prompt"] == ["Ann gave Bo a gift because Ann was generous.\n\nCy thanked Di because Cy",
                                "Ann gave Bo a gift because Ann was generous.\n\nCy thanked Di because Di"]
    assert sample["continuation"] == "had helped." and sample["num_tokens"] == [12, 12]
    for r in (zero, one):
        _check_samples_against_plain(model, tok, r)


def test_lambada_accuracy_is_greedy_match_and_perplexity_uses_the_summed_loglikelihoods(
        tmp_path: Path, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, tok = model_and_tokenizer
    task = load_task(str(write_jsonl(tmp_path / "lambada.jsonl", CONTINUATION_RECORDS)))
    [result] = evaluate_task(model, tok, task, [1])
    _check_samples_against_plain(model, tok, result)
    lls = [s["loglikelihood"] for s in result.samples]
    assert result.metrics["perplexity"] == pytest.approx(math.exp(-sum(lls) / len(lls)))
    greedy = [plain_loglikelihood(model, *pair)[1] for pair in encode_pairs(
        tok, [(s["prompt"], " " + s["continuation"]) for s in result.samples])]
    assert result.metrics["acc"] == sum(greedy) / len(greedy)


def test_markdown_table_has_a_column_per_shot_count() -> None:
    results = [
        TaskResult("qa", 0, 20, {"acc": 0.5, "acc_stderr": 0.1147, "acc_norm": 0.45, "acc_norm_stderr": 0.1141}),
        TaskResult("qa", 5, 20, {"acc": 0.55, "acc_stderr": 0.1141, "acc_norm": 0.6, "acc_norm_stderr": 0.1124}),
        TaskResult("lambada", 0, 20, {"acc": 0.3, "acc_stderr": 0.1051, "perplexity": 66.9, "perplexity_stderr": 44.5}),
    ]
    assert markdown_table(results) == (
        "| task | metric | 0-shot | 5-shot | n |\n"
        "|---|---|---:|---:|---:|\n"
        "| qa | acc | 0.5000 ± 0.1147 | 0.5500 ± 0.1141 | 20 |\n"
        "| qa | acc_norm | 0.4500 ± 0.1141 | 0.6000 ± 0.1124 | 20 |\n"
        "| lambada | acc | 0.3000 ± 0.1051 |  | 20 |\n"
        "| lambada | perplexity | 66.9000 ± 44.5000 |  | 20 |\n"
    )


def test_write_outputs(tmp_path: Path) -> None:
    results = [TaskResult("qa", k, 2, {"acc": 0.5, "acc_stderr": 0.5}, [{"index": 0}, {"index": 1}]) for k in (0, 1)]
    written = write_outputs(results, tmp_path / "out", meta={"model": "m"})
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["model"] == "m"
    assert data["results"]["qa"]["1"] == {"acc": 0.5, "acc_stderr": 0.5, "n": 2, "elapsed_s": 0.0}
    assert (tmp_path / "out" / "samples_qa_1shot.jsonl").read_text().count("\n") == 2
    pytest.importorskip("matplotlib")
    assert written["icl.png"].stat().st_size > 0


def test_shared_task_files_match_the_plain_scorer(shared_data: Path) -> None:
    """Two items of every shared task at 2 shots on a tiny model with a 256-token window: real prompt lengths, so
    long BoolQ and LAMBADA prompts are cut on the left as lm-evaluation-harness cuts them."""
    from alignkit.eval.tasks import known_tasks

    known = known_tasks(shared_data)
    if not known:
        pytest.skip(f"no icl_eval folder in {shared_data}")
    model, tok = tiny_model(max_position_embeddings=256), char_tokenizer()
    for name in known:
        [result] = evaluate_task(model, tok, load_task(name, shared_data), [2], limit=2)
        assert result.num_items == 2
        _check_samples_against_plain(model, tok, result)
