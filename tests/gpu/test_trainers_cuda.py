"""The trainers end to end on CUDA (`train.device: cuda`): pretraining (packed rows), SFT, DPO and the reward model
on tiny models and in-code data log the same per-step losses, gradient norms and held-out metrics as the same run
on the CPU (fp32), and a bf16 run on CUDA finishes with finite losses close to fp32's at the first step."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from alignkit.config import config_from_dict
from alignkit.trainers import run
from alignkit.trainers.configs import PretrainConfig, SFTConfig
from alignkit.trainers.preference_configs import DPOConfig, RMConfig
from tests.gpu.helpers import GPU
from tests.trainers.preference_helpers import fruit_pairs, marked_pairs, tiny_base, write_jsonl
from tests.trainers.test_trainers import TINY, base_model, chats, corpus

pytestmark = GPU

# 4 optimizer steps of 8 sequences in 2 micro-batches (accumulation), held-out metrics after steps 2 and 4.
TRAIN = {"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "eval_every": 2, "report_to": []}
# Numbers every compared row must agree on (held-out metrics where the row has them).
COMPARED = ("loss", "grad_norm", "eval/loss", "rewards/margins", "eval/rewards/margins", "eval/accuracy")


def pretrain_spec(tmp_path: Path) -> tuple[type, dict[str, Any]]:
    return PretrainConfig, {
        "model": {"init": TINY}, "tokenizer": "byte",
        "data": {"train": write_jsonl(tmp_path / "corpus.jsonl", corpus(64)), "max_length": 64, "eval_size": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
    }


def sft_spec(tmp_path: Path) -> tuple[type, dict[str, Any]]:
    return SFTConfig, {
        "model": {"path": base_model(tmp_path)},
        "data": {"train": write_jsonl(tmp_path / "chat.jsonl", chats(48)), "max_length": 64, "eval_size": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
    }


# Preference stages run padded [2B, T] batches and packed pairs sharing their prompt (data.packing).
def dpo_spec(tmp_path: Path, *, packing: bool) -> tuple[type, dict[str, Any]]:
    return DPOConfig, {
        "model": {"path": tiny_base(tmp_path / "base")},
        "data": {"train": write_jsonl(tmp_path / "pairs.jsonl", fruit_pairs(48)), "max_length": 96, "eval_size": 8,
                 "packing": packing},
        "optim": {"lr": 5e-3, "warmup_steps": 0, "schedule": "constant"},
        "dpo": {"beta": 0.5},
    }


def rm_spec(tmp_path: Path, *, packing: bool) -> tuple[type, dict[str, Any]]:
    return RMConfig, {
        "model": {"path": tiny_base(tmp_path / "base")},
        "data": {"train": write_jsonl(tmp_path / "pairs.jsonl", marked_pairs(48)), "max_length": 64, "eval_size": 8,
                 "packing": packing},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
    }


STAGES: dict[str, tuple[str, Callable[[Path], tuple[type, dict[str, Any]]]]] = {
    "pretrain": ("pretrain", pretrain_spec),
    "sft": ("sft", sft_spec),
    "dpo": ("dpo", lambda p: dpo_spec(p, packing=False)),
    "dpo_packed": ("dpo", lambda p: dpo_spec(p, packing=True)),
    "rm": ("rm", lambda p: rm_spec(p, packing=False)),
    "rm_packed": ("rm", lambda p: rm_spec(p, packing=True)),
}


def train_rows(stage: str, config_cls: type, spec: dict[str, Any], out: Path, *, device: str,
               precision: str = "fp32") -> list[dict[str, Any]]:
    train = {**TRAIN, "device": device, "precision": precision, "output_dir": str(out)}
    cfg = config_from_dict(config_cls, {**spec, "train": train})
    return [row for row in run(stage, cfg).metrics if row.get("step", 0) >= 1]


def _check_stage_matches_cpu(name: str, tmp_path: Path, device: str) -> dict[str, list[float]]:
    stage, make_spec = STAGES[name]
    config_cls, spec = make_spec(tmp_path)
    cpu = train_rows(stage, config_cls, spec, tmp_path / "run-cpu", device="cpu")
    dev = train_rows(stage, config_cls, spec, tmp_path / f"run-{device}-fp32", device=device)
    assert [r["step"] for r in dev] == [r["step"] for r in cpu] == [1, 2, 3, 4]
    compared = 0
    for a, b in zip(cpu, dev):
        for key in COMPARED:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (name, a["step"], key)
                compared += 1
    assert compared >= 10, compared  # loss and grad_norm of every step, plus held-out numbers
    assert cpu[-1]["loss"] != cpu[0]["loss"]  # training moved: the comparison covers optimizer updates

    bf16 = train_rows(stage, config_cls, spec, tmp_path / f"run-{device}-bf16", device=device, precision="bf16")
    losses = [r["loss"] for r in bf16]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses
    assert losses[0] == pytest.approx(cpu[0]["loss"], rel=2e-2)
    return {"cpu": [r["loss"] for r in cpu], device: [r["loss"] for r in dev], f"{device}-bf16": losses}


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_on_cuda_logs_the_cpu_losses(name: str, tmp_path: Path) -> None:
    print(name, _check_stage_matches_cpu(name, tmp_path, "cuda"))
