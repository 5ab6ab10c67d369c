"""File modes: weight files and folders alignkit writes follow the umask (safetensors alone writes 0600)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from alignkit.checkpoint import save_hf_model
from alignkit.checkpoint.files import current_umask, save_safetensors
from alignkit.engine.checkpoint import save_checkpoint
from alignkit.model.lora import save_adapter
from alignkit.trainers.common import add_lora
from alignkit.trainers.configs import LoRASection
from tests.checkpoint.helpers import make_model
from tests.conftest import tiny_config


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Mode bits of every file and folder under `root`, by relative path ('.' for root itself)."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        out[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return out


def assert_umask_modes(root: Path, umask: int) -> None:
    found = modes(root)
    assert any(name.endswith((".safetensors", ".distcp")) for name in found), found
    for name, mode in found.items():
        expected = (0o777 if (root / name).is_dir() else 0o666) & ~umask
        assert mode == expected, f"{name}: {oct(mode)}, expected {oct(expected)} under umask {oct(umask)}"


def test_current_umask_reads_without_changing_it(umask: int) -> None:
    assert current_umask() == umask
    assert current_umask() == umask


def test_hf_model_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    model = make_model(tiny_config())
    save_hf_model(model, tmp_path / "hf")
    save_hf_model(model, tmp_path / "hf")  # replacing a model directory too
    assert_umask_modes(tmp_path / "hf", umask)


def test_adapter_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    model = make_model(tiny_config())
    add_lora(model, LoRASection(enabled=True, rank=2))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="base")  # a new folder (from mkdtemp)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="base")  # files replaced in place
    assert_umask_modes(tmp_path / "adapter", umask)


def test_checkpoint_and_tensor_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    model = make_model(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "run", 1, models={"model": model}, optimizers={"model": optimizer}, state={})
    assert_umask_modes(tmp_path / "run", umask)
    save_safetensors({"x": torch.zeros(2)}, tmp_path / "logps.safetensors")  # DPO's reference log-probs
    assert stat.S_IMODE((tmp_path / "logps.safetensors").stat().st_mode) == 0o666 & ~umask
