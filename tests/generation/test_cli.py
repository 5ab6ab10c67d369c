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


def test_cli_json_prints_one_object_per_sample(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import alignkit

    model, tokenizer = alignkit.load(str(tiny_model_dir))
    assert tokenizer is not None
    params = SamplingParams(max_new_tokens=5, temperature=1.0, n=3, seed=4)
    expected = generate(model, [tokenizer.encode("ab")], params, tokenizer=tokenizer)
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "ab", "--max-new-tokens", "5",
            "--temperature", "1.0", "--n", "3", "--seed", "4", "--json"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [
        {"text": c.text, "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)} for c in expected]
    assert all(0 < len(c.token_ids) <= 5 for c in expected)


def test_cli_json_keeps_a_sample_with_blank_lines_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from alignkit.generation.cli import print_json

    print_json("first\n\nsecond", "stop", 4)
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line) == {"text": "first\n\nsecond", "finish_reason": "stop", "num_tokens": 4}


def test_cli_points_a_reward_model_to_alignkit_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from alignkit.model import LlamaForScore

    reward_model = LlamaForScore(tiny_config())
    reward_model.init_weights()
    save_hf_model(reward_model, tmp_path / "rm" / "final", tokenizer=char_tokenizer())  # an rm run directory
    assert main(["generate", "--model", str(tmp_path / "rm"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'rm'} is a reward model" in err
    assert f"alignkit score --model {tmp_path / 'rm'} --prompt TEXT --response TEXT" in err
    assert "kind=" not in err and "loading" not in err  # refused before the model loads, with no Python hint
