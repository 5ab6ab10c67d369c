"""torchrun with one process on CUDA trains exactly like a plain process: NCCL collectives, the DDP wrapper (and its
kill-and-resume), and FSDP2, each on a process group of one (tests/engine/dist_worker.py --group)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.engine.test_distributed import launch, rows
from tests.gpu.helpers import GPU

pytestmark = [*GPU, pytest.mark.distributed]

def plain(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """The worker as one ordinary process (no torchrun, no process group)."""
    cmd = [sys.executable, "-m", "tests.engine.dist_worker", str(run_dir), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)


def assert_same_rows(expected: list[dict], actual: list[dict], *, rel: float) -> None:
    assert [r["step"] for r in actual] == [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, actual):
        assert a["num_tokens"] == b["num_tokens"]
        for key in ("loss", "grad_norm", "token_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=rel), (a["step"], key)


def plain_rows(root: Path, device: str) -> dict[str, list[dict]]:
    """metrics.jsonl rows of the worker as a plain process on the CPU and on `device` (the references below)."""
    out = {}
    for folder, name in (("plain-cpu", "cpu"), ("plain-device", device)):
        done = plain(root / folder, "--device", name)
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = rows(root / folder)
    return out


def _check_plain_device_matches_cpu(reference: dict[str, list[dict]], device: str) -> None:
    assert reference["cpu"][-1]["loss"] < reference["cpu"][0]["loss"]
    assert_same_rows(reference["cpu"], reference[device], rel=1e-4)


def _check_ddp_matches_plain_and_resumes(tmp_path: Path, device: str, reference: list[dict]) -> None:
    ddp = launch(tmp_path / "ddp", "--device", device, "--group", nproc=1)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert_same_rows(reference, rows(tmp_path / "ddp"), rel=1e-5)
    # Killed after the step-4 checkpoint (asking for step 6), then resumed: the same rows as the uninterrupted run.
    killed = launch(tmp_path / "resumed", "--device", device, "--group", "--kill-at", "6", nproc=1)
    assert killed.returncode != 0
    assert (tmp_path / "resumed" / "checkpoints" / "step_000004" / "state.json").exists()
    resumed = launch(tmp_path / "resumed", "--device", device, "--group", "--resume", nproc=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Not bitwise: CUDA backward kernels with atomics (index_add, attention) may round differently run to run.
    assert_same_rows(rows(tmp_path / "ddp"), rows(tmp_path / "resumed"), rel=1e-5)


def _check_fsdp2_matches_plain(tmp_path: Path, device: str, reference: list[dict]) -> None:
    # Sharded checkpoints through torch.distributed.checkpoint (every 2 steps), then a kill and a resume.
    fsdp2 = launch(tmp_path / "fsdp2", "--device", device, "--group", "--strategy", "fsdp2", nproc=1)
    assert fsdp2.returncode == 0, fsdp2.stderr[-3000:]
    assert_same_rows(reference, rows(tmp_path / "fsdp2"), rel=1e-5)
    killed = launch(tmp_path / "fsdp2-resumed", "--device", device, "--group", "--strategy", "fsdp2",
                    "--kill-at", "6", nproc=1)
    assert killed.returncode != 0
    resumed = launch(tmp_path / "fsdp2-resumed", "--device", device, "--group", "--strategy", "fsdp2", "--resume",
                     nproc=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_rows(rows(tmp_path / "fsdp2"), rows(tmp_path / "fsdp2-resumed"), rel=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    return plain_rows(tmp_path_factory.mktemp("plain"), "cuda")


def test_plain_process_on_cuda_matches_cpu(reference: dict[str, list[dict]]) -> None:
    _check_plain_device_matches_cpu(reference, "cuda")


def test_torchrun_ddp_on_one_gpu_matches_plain_process_and_resumes(
    tmp_path: Path, reference: dict[str, list[dict]]
) -> None:
    _check_ddp_matches_plain_and_resumes(tmp_path, "cuda", reference["cuda"])


def test_torchrun_fsdp2_on_one_gpu_matches_plain_process(tmp_path: Path, reference: dict[str, list[dict]]) -> None:
    _check_fsdp2_matches_plain(tmp_path, "cuda", reference["cuda"])
