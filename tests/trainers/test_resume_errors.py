"""Resuming refuses what it cannot continue exactly, with a message naming the key and both values, before any
work and without touching the run directory: another stage's run, changed shapes or data, only a cut-off
checkpoint, or a plain restart over an existing run."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.config import config_from_dict
from alignkit.errors import ConfigError
from alignkit.trainers import run
from alignkit.trainers.configs import PretrainConfig, SFTConfig
from tests.trainers.test_trainers import TINY, base_model, chats, corpus, write_jsonl


def pretrain_cfg(tmp_path: Path, **train: object) -> PretrainConfig:
    return config_from_dict(PretrainConfig, {
        "model": {"init": TINY}, "tokenizer": "byte",
        "data": {"train": write_jsonl(tmp_path / "corpus.jsonl", corpus(40)), "max_length": 32, "eval_size": 0,
                 "eval_fraction": 0.0},
        "optim": {"lr": 3e-3},
        "train": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "output_dir": str(tmp_path / "run"),
                  "report_to": [], "peak_flops": 1e12, **train},
    })


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_refusals_leave_the_run_untouched(tmp_path: Path) -> None:
    run("pretrain", pretrain_cfg(tmp_path))
    before = snapshot(tmp_path / "run")

    # A plain restart over a finished run.
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run("pretrain", pretrain_cfg(tmp_path))
    # A shape change: the message names the key and both values.
    wider = pretrain_cfg(tmp_path, resume=True)
    wider.model.init = {**TINY, "hidden_size": 64}
    with pytest.raises(ConfigError, match=r"model.init=.*'hidden_size': 64.*trained with model.init=.*'hidden_size': 32"):
        run("pretrain", wider)
    with pytest.raises(ConfigError, match=r"train.batch_size=8, but its checkpoints were trained with train.batch_size=4"):
        run("pretrain", pretrain_cfg(tmp_path, resume=True, batch_size=8, micro_batch_size=4))
    # Another stage's run.
    sft = config_from_dict(SFTConfig, {
        "model": {"path": base_model(tmp_path)},
        "data": {"train": write_jsonl(tmp_path / "chats.jsonl", chats(16)), "eval_size": 0, "eval_fraction": 0.0},
        "train": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 1, "output_dir": str(tmp_path / "run"),
                  "report_to": [], "resume": True, "peak_flops": 1e12},
    })
    with pytest.raises(ConfigError, match=r"holds a 'pretrain' run; it cannot be resumed by `alignkit train sft`"):
        run("sft", sft)
    assert snapshot(tmp_path / "run") == before


def test_resume_with_only_a_cut_off_checkpoint_is_refused(tmp_path: Path) -> None:
    cfg = pretrain_cfg(tmp_path)
    run("pretrain", cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step_000002").rename(checkpoints / ".tmp-step_000002")  # as a save killed before its rename
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"holds only .tmp-step_000002, a checkpoint cut off while it was being written"):
        run("pretrain", pretrain_cfg(tmp_path, resume=True, max_steps=4))
    assert snapshot(tmp_path / "run") == before
