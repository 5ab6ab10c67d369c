"""Domain adaptation: SFT on a domain mixed with general replay (data.train as a list), with the eval section
tracking a few-shot multiple-choice task at every evaluation; the tracked score is what `alignkit eval` gives the
same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    result = run("sft", sft_cfg(tmp_path, icl_tasks=[task_path]))
    rows = [r for r in result.metrics if "eval/fruit/acc" in r]
    assert [r["step"] for r in rows][-2:] == [2, 4], rows
    assert all("eval/loss" in r and "eval/fruit/acc_norm" in r for r in rows)
    # The last evaluation scored the final weights: the harness on the exported model gives the same numbers.
    import alignkit

    model, tokenizer = alignkit.load(str(result.final_model_dir))
    (expected,) = evaluate_task(model, tokenizer, load_task(task_path), [2], limit=10)
    assert rows[-1]["eval/fruit/acc"] == pytest.approx(expected.metrics["acc"], abs=1e-9)
    assert rows[-1]["eval/fruit/acc_norm"] == pytest.approx(expected.metrics["acc_norm"], abs=1e-9)


def test_a_bad_task_fails_before_the_run_starts(tmp_path: Path) -> None:
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n")
    with pytest.raises(ConfigError, match="leaves nothing to score"):
        run("sft", sft_cfg(tmp_path, icl_tasks=[str(small)]))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="eval.icl_shots must be >= 0"):
        sft_cfg(tmp_path, icl_shots=-1)
