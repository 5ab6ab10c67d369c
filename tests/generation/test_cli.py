"""`alignkit generate`: stdout carries only the completion text, the same text the library returns."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.checkpoint.hf import save_hf_model
from alignkit.cli import main
from alignkit.generation import SamplingParams, generate
from tests.conftest import tiny_config
from tests.generation.test_engine import char_tokenizer
from tests.model.test_llama import make


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    model, tokenizer = make(tiny_config()), char_tokenizer()
    save_hf_model(model, tmp_path / "tiny", tokenizer=tokenizer)
    return tmp_path / "tiny"


def test_cli_prints_only_the_completion(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import alignkit

    model, tokenizer = alignkit.load(str(tiny_model_dir))
    assert tokenizer is not None
    expected = generate(model, [tokenizer.encode("Hello")], SamplingParams(max_new_tokens=6, temperature=0),
                        tokenizer=tokenizer)[0].text
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "Hello", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{expected}\n"
    assert "loading" in captured.err


def test_cli_n_samples_are_separated_by_blank_lines(tiny_model_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import alignkit

    model, tokenizer = alignkit.load(str(tiny_model_dir))
    assert tokenizer is not None
    params = SamplingParams(max_new_tokens=5, temperature=1.0, n=2, seed=4)
    expected = [c.text for c in generate(model, [tokenizer.encode("ab")], params, tokenizer=tokenizer)]
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "ab", "--max-new-tokens", "5",
            "--temperature", "1.0", "--n", "2", "--seed", "4"]
    assert main(argv) == 0
    assert expected[0] != expected[1]
    assert capsys.readouterr().out == f"{expected[0]}\n\n{expected[1]}\n"


def test_cli_rejects_system_without_chat(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--system", "be brief"])
    assert code == 2
    assert "--system only applies to --chat" in capsys.readouterr().err
