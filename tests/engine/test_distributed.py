"""Two CPU processes under torchrun (gloo) train exactly like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def launch(run_dir: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tests.engine.dist_worker", str(run_dir), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_and_resume(tmp_path: Path) -> None:
    # One process: 2 micro-batches of 4 per step. Two processes: 1 micro-batch of 4 each. Same global batch of 8.
    single = launch(tmp_path / "single", "--micro", "4", nproc=1)
    assert single.returncode == 0, single.stderr[-3000:]
    double = launch(tmp_path / "double", "--micro", "4")
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = rows(tmp_path / "single"), rows(tmp_path / "double")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    assert two[-1]["loss"] < two[0]["loss"]
    # Per-metric reductions over ranks: the extremes over both ranks, the sum over all micro-batches (2 either way).
    assert {(r["rank_min"], r["rank_max"], r["micro_batches"]) for r in one} == {(0, 0, 2)}
    assert {(r["rank_min"], r["rank_max"], r["micro_batches"]) for r in two} == {(0, 1, 2)}
    for a, b in zip(one, two):
        assert a["num_tokens"] == b["num_tokens"]
        for key in ("loss", "grad_norm", "token_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["step"], key)

    # Killed after the step-4 checkpoint was written (while asking for step 6), then resumed with 2 processes.
    killed = launch(tmp_path / "resumed", "--micro", "4", "--kill-at", "6")
    assert killed.returncode != 0
    assert (tmp_path / "resumed" / "checkpoints" / "step_000004" / "state.json").exists()
    resumed = launch(tmp_path / "resumed", "--micro", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = rows(tmp_path / "resumed")
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(two, again):
        for key in ("loss", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key)


def test_generation_under_fsdp2_uses_the_full_weights(tmp_path: Path) -> None:
    """engine.generation_model all-gathers FSDP2 shards for the rollout: greedy tokens equal the plain model's on
    every rank, and the parameters are sharded again (and back in training mode) afterwards."""
    from alignkit.generation import SamplingParams, generate
    from tests.engine.generation_worker import PROMPTS
    from tests.engine.helpers import tiny_model

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.engine.generation_worker", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [c.token_ids for c in generate(tiny_model(0), PROMPTS, SamplingParams(
        temperature=0, max_new_tokens=8, stop_token_ids=[]))]
    for rank in (0, 1):
        written = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert written == {"tokens": expected, "sharded_again": True, "training": True}


def test_fsdp2_checkpoints_resume_at_another_world_size(tmp_path: Path) -> None:
    """FSDP2 with two processes trains like one and checkpoints through DCP; a run killed after its step-4
    checkpoint resumes with the other number of processes (2 -> 1 and 1 -> 2) and gets the uninterrupted losses."""
    single = launch(tmp_path / "single", "--micro", "4", nproc=1)
    assert single.returncode == 0, single.stderr[-3000:]
    one = rows(tmp_path / "single")
    sharded = launch(tmp_path / "fsdp2", "--micro", "4", "--strategy", "fsdp2")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert (tmp_path / "fsdp2" / "checkpoints" / "step_000006" / "model" / "__1_0.distcp").exists()  # rank 1's shards

    def close(a: list[dict], b: list[dict]) -> None:
        assert [r["step"] for r in b] == [r["step"] for r in a]
        for x, y in zip(a, b):
            for key in ("loss", "grad_norm"):
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), (x["step"], key)

    close(one, rows(tmp_path / "fsdp2"))
    # Same world size: the resumed run equals the uninterrupted one exactly.
    killed = launch(tmp_path / "2to2", "--micro", "4", "--kill-at", "6", "--strategy", "fsdp2")
    assert killed.returncode != 0
    resumed = launch(tmp_path / "2to2", "--micro", "4", "--resume", "--strategy", "fsdp2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for a, b in zip(rows(tmp_path / "fsdp2"), rows(tmp_path / "2to2")):
        for key in ("loss", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key)
    for name, first, then in (("2to1", ("--strategy", "fsdp2"), ()), ("1to2", (), ("--strategy", "fsdp2"))):
        killed = launch(tmp_path / name, "--micro", "4", "--kill-at", "6", *first, nproc=2 if first else 1)
        assert killed.returncode != 0
        resumed = launch(tmp_path / name, "--micro", "4", "--resume", *then, nproc=2 if then else 1)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        close(one, rows(tmp_path / name))
