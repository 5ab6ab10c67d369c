"""`alignkit serve`: the command's flags, its defaults (127.0.0.1), and its one-sentence errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from alignkit.cli import build_parser, main
from alignkit.errors import CheckpointError, ConfigError, UserError
from alignkit.serve.server import build_app, default_model_name, require_web_stack
from tests.serve.conftest import char_tokenizer, tiny_model


def test_serve_flags_and_defaults() -> None:
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.api_key, args.dtype, args.max_batch_size, args.max_queue, args.timeout,
            args.served_model_name) == ("127.0.0.1", 8000, None, "float32", 8, 128, 600.0, None)
    args = build_parser().parse_args(["serve", "--model", "m", "--host", "0.0.0.0", "--port", "9", "--api-key", "k",
                                      "--dtype", "bfloat16", "--max-batch-size", "4", "--max-queue", "2",
                                      "--timeout", "5", "--served-model-name", "x"])
    assert (args.host, args.port, args.api_key, args.max_batch_size, args.max_queue, args.timeout,
            args.served_model_name) == ("0.0.0.0", 9, "k", 4, 2, 5.0, "x")


def test_missing_web_stack_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # makes `import uvicorn` fail
    with pytest.raises(UserError, match=r'uvicorn.*pip install -e "\.\[serve\]"'):
        require_web_stack()


def test_bad_settings_and_missing_tokenizer_are_user_errors() -> None:
    model = tiny_model()
    with pytest.raises(ConfigError, match="--max-batch-size must be >= 1"):
        build_app(model, char_tokenizer(), model_name="m", max_batch_size=0)
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        build_app(model, None, model_name="m")


def test_bad_dtype_fails_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", "nowhere", "--dtype", "float8"]) == 2
    assert "--dtype 'float8' is not one of float32, bfloat16, float16." in capsys.readouterr().err


def test_default_model_name(tmp_path: Path) -> None:
    (tmp_path / "my-model").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"")
    assert default_model_name(str(tmp_path / "my-model")) == "my-model"
    assert default_model_name(str(tmp_path / "m.gguf")) == "m"
    assert default_model_name("smollm2-135m-instruct") == "smollm2-135m-instruct"
