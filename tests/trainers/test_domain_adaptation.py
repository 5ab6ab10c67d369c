"""Domain adaptation: SFT on a domain mixed with general replay (data.train as a list), with the eval section
tracking a few-shot multiple-choice task at every evaluation; the tracked score is what `alignkit eval` gives the
same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.config import config_from_dict
from alignkit.errors import ConfigError
from alignkit.eval.harness import evaluate_task
from alignkit.eval.tasks import load_task
from alignkit.trainers import run
from alignkit.trainers.configs import SFTConfig
from tests.trainers.test_trainers import WORDS, base_model, chats, write_jsonl


def fruit_task(path: Path, n: int = 24) -> str:
    """A multiple-choice task in the icl_eval layout: which fruit follows this one in the list?"""
    rows = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        choices = [WORDS[(i + k) % len(WORDS)] for k in (1, 3, 5)]
        rows.append({"query": f"after {word}?", "choices": choices, "gold": 0})
    return write_jsonl(path, rows)


def next_word_task(path: Path, n: int = 24) -> str:
    """The same list as a LAMBADA-layout task: the continuation is the next word."""
    rows = [{"context": f"after {WORDS[i % len(WORDS)]} comes", "continuation": f" {WORDS[(i + 1) % len(WORDS)]}"}
            for i in range(n)]
    return write_jsonl(path, rows)


def sft_cfg(tmp_path: Path, **eval_section: object) -> SFTConfig:
    general = [{"instruction": f"say {w}", "output": w} for w in WORDS * 4]
    return config_from_dict(SFTConfig, {
        "model": {"path": base_model(tmp_path)},
        "data": {"train": [write_jsonl(tmp_path / "domain.jsonl", chats(64)),
                           write_jsonl(tmp_path / "general.jsonl", general)],
                 "weights": [0.75, 0.25], "max_length": 64, "eval_size": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 4, "eval_every": 2,
                  "output_dir": str(tmp_path / "run"), "report_to": []},
        "eval": {"icl_shots": 2, "icl_limit": 10, **eval_section},
    })


def test_sft_on_a_mixture_tracks_a_few_shot_task_as_alignkit_eval_scores_it(tmp_path: Path) -> None:
    task_path = fruit_task(tmp_path / "fruit.jsonl")
    lambada_path = next_word_task(tmp_path / "next_word.jsonl")
    result = run("sft", sft_cfg(tmp_path, icl_tasks=[task_path, lambada_path]))
    rows = [r for r in result.metrics if "eval/fruit/acc" in r]
    assert [r["step"] for r in rows][-2:] == [2, 4], rows
    assert all("eval/loss" in r and "eval/fruit/acc_norm" in r and "eval/next_word/perplexity" in r for r in rows)
    # The last evaluation scored the final weights: the harness on the exported model gives the same numbers.
    import alignkit

    model, tokenizer = alignkit.load(str(result.final_model_dir))
    (expected,) = evaluate_task(model, tokenizer, load_task(task_path), [2], limit=10)
    assert rows[-1]["eval/fruit/acc"] == pytest.approx(expected.metrics["acc"], abs=1e-9)
    assert rows[-1]["eval/fruit/acc_norm"] == pytest.approx(expected.metrics["acc_norm"], abs=1e-9)
    (expected,) = evaluate_task(model, tokenizer, load_task(lambada_path), [2], limit=10)
    assert rows[-1]["eval/next_word/acc"] == pytest.approx(expected.metrics["acc"], abs=1e-9)
    assert rows[-1]["eval/next_word/perplexity"] == pytest.approx(expected.metrics["perplexity"], rel=1e-9)


def test_a_bad_task_fails_before_the_run_starts(tmp_path: Path) -> None:
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n")
    with pytest.raises(ConfigError, match="leaves nothing to score"):
        run("sft", sft_cfg(tmp_path, icl_tasks=[str(small)]))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="eval.icl_shots must be >= 0"):
        sft_cfg(tmp_path, icl_shots=-1)


def test_eval_section_metrics_of_two_ranks_equal_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank scores every second record; the sums the ranks all-reduce give one process's acc, acc_norm and
    LAMBADA perplexity (exp of the mean log-likelihood, so its log is what the ranks average)."""
    import contextlib

    import alignkit
    from alignkit.engine import DistInfo
    from alignkit.trainers import stage
    from alignkit.trainers.configs import EvalSection

    model, tokenizer = alignkit.load(base_model(tmp_path))
    paths = [fruit_task(tmp_path / "fruit.jsonl"), next_word_task(tmp_path / "next_word.jsonl")]
    section = EvalSection(icl_tasks=paths, icl_shots=2, icl_limit=11)  # an odd count: the ranks' shares differ

    def evaluate(rank: int, world_size: int) -> dict[str, float]:
        check = stage.task_eval(section, tokenizer, DistInfo(rank=rank, world_size=world_size),
                                lambda: contextlib.nullcontext(model))
        assert check is not None
        return check({})

    single = evaluate(0, 1)
    local: list[torch.Tensor] = []  # each rank's tensors, in the order they are all-reduced
    monkeypatch.setattr(stage.dist, "all_reduce_sum", lambda t: local.append(t.clone()) or t)
    evaluate(0, 2)
    evaluate(1, 2)
    half = len(local) // 2
    reduced = iter([a + b for a, b in zip(local[:half], local[half:])])
    monkeypatch.setattr(stage.dist, "all_reduce_sum", lambda t: next(reduced))
    double = evaluate(0, 2)
    assert set(single) == set(double) == {"eval/fruit/acc", "eval/fruit/acc_norm", "eval/next_word/acc",
                                          "eval/next_word/perplexity"}
    for key in single:
        # A rank batches other records together, so log-likelihoods move in the last fp32 bits: perplexity, the
        # exponential of their mean, gets a relative tolerance; the accuracies are counts and must agree.
        assert double[key] == pytest.approx(single[key], rel=1e-5 if key.endswith("perplexity") else 1e-12), key
