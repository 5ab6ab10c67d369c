"""`alignkit chat`: the streamed answers are `generate()`'s greedy answers for the same conversation."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from alignkit.checkpoint.hf import save_hf_model
from alignkit.cli import main
from alignkit.errors import CheckpointError
from alignkit.generation import SamplingParams, generate
from alignkit.model import LlamaForCausalLM
from alignkit.serve.chat import chat
from alignkit.tokenizer import Tokenizer
from tests.conftest import tiny_config
from tests.generation.test_engine import ForwardRecorder
from tests.model.test_llama import make

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def chat_tokenizer() -> Tokenizer:
    """One token per character (id 0 is <|endoftext|>, the stop token) and a plain-text chat template."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)] + [chr(c) for c in range(161, 161 + 31)]
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(chars)}}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, eos_token="<|endoftext|>", chat_template=TEMPLATE)


def expected_answers(model: LlamaForCausalLM, tokenizer: Tokenizer, turns: list[list[str]], params: SamplingParams,
                     system: str | None = None) -> list[str]:
    """generate()'s answer to each user line, conversation by conversation (a new list after a /reset)."""
    answers = []
    for conversation in turns:
        messages = [{"role": "system", "content": system}] if system is not None else []
        for line in conversation:
            messages.append({"role": "user", "content": line})
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True).input_ids
            text = generate(model, [prompt], params, tokenizer=tokenizer)[0].text
            assert text is not None
            answers.append(text)
            messages.append({"role": "assistant", "content": text})
    return answers


def test_chat_streams_generate_answers_keeps_history_and_resets() -> None:
    model, tokenizer = make(tiny_config()), chat_tokenizer()
    params = SamplingParams(max_new_tokens=12, temperature=0)
    stdout, stderr = io.StringIO(), io.StringIO()
    recorder = ForwardRecorder(model)
    conversation = chat(model, tokenizer, params, system="Be brief.",
                        stdin=io.StringIO("Hello\nHow are you?\n\n/reset\nHello\n/exit\nnever read\n"),
                        stdout=stdout, stderr=stderr)
    recorder.handle.remove()
    answers = expected_answers(model, tokenizer, [["Hello", "How are you?"], ["Hello"]], params, system="Be brief.")
    assert stdout.getvalue() == "".join(f"{a}\n" for a in answers)
    # Each prompt is the whole conversation so far: the second holds the first exchange, the third (after /reset)
    # only the system message and its own line.
    system = {"role": "system", "content": "Be brief."}
    histories = [[system, {"role": "user", "content": "Hello"}],
                 [system, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": answers[0]},
                  {"role": "user", "content": "How are you?"}],
                 [system, {"role": "user", "content": "Hello"}]]
    prefills = [seq for _, seq in recorder.calls if seq > 1]
    assert prefills == [len(tokenizer.apply_chat_template(h, add_generation_prompt=True).input_ids)
                        for h in histories]
    assert conversation == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                            {"role": "assistant", "content": answers[2]}]
    assert "conversation cleared" in stderr.getvalue()


def test_chat_drops_the_oldest_exchange_when_the_context_is_full() -> None:
    model, tokenizer = make(tiny_config(max_position_embeddings=48)), chat_tokenizer()
    params = SamplingParams(max_new_tokens=6, temperature=0)
    stdout, stderr = io.StringIO(), io.StringIO()
    lines = ["first question", "second question", "x" * 60, "third one"]
    conversation = chat(model, tokenizer, params, stdin=io.StringIO("\n".join(lines) + "\n"), stdout=stdout,
                        stderr=stderr)
    assert "oldest exchange was dropped" in stderr.getvalue() and "write a shorter one" in stderr.getvalue()
    assert [m["content"] for m in conversation if m["role"] == "user"] == ["third one"]
    assert len(stdout.getvalue().splitlines()) == 3  # the too-long line got no answer


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    save_hf_model(make(tiny_config()), tmp_path / "tiny", tokenizer=chat_tokenizer())
    return tmp_path / "tiny"


def test_cli_chat_reads_stdin_until_eof(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import alignkit

    model, tokenizer = alignkit.load(str(tiny_model_dir))
    assert tokenizer is not None and tokenizer.chat_template == TEMPLATE
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, repetition_penalty=1.2, seed=3)
    # Answer k uses seed + k, so a seeded session is reproducible and its answers are not all drawn alike.
    expected = []
    messages: list[dict[str, str]] = []
    for k, line in enumerate(["Hi", "And then?"]):
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True).input_ids
        text = generate(model, [prompt], replace(params, seed=3 + k), tokenizer=tokenizer)[0].text
        assert text is not None
        expected.append(text)
        messages.append({"role": "assistant", "content": text})
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nAnd then?\n"))
    argv = ["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--temperature", "0.9", "--top-k", "20",
            "--repetition-penalty", "1.2", "--seed", "3"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{expected[0]}\n{expected[1]}\n"
    assert "loading" in captured.err


@pytest.mark.slow
def test_chat_with_smollm2_streams_the_greedy_answers() -> None:
    import alignkit

    try:
        model, tokenizer = alignkit.load("smollm2-135m-instruct")
    except CheckpointError as e:
        pytest.skip(f"smollm2-135m-instruct is not available: {e}")
    assert tokenizer is not None
    params = SamplingParams(max_new_tokens=40, temperature=0)
    stdout = io.StringIO()
    chat(model, tokenizer, params, stdin=io.StringIO("What is the capital of France?\nAnd of Italy?\n"),
         stdout=stdout, stderr=io.StringIO())
    answers = expected_answers(model, tokenizer, [["What is the capital of France?", "And of Italy?"]], params)
    assert "Paris" in answers[0] and "Rome" in answers[1]
    assert stdout.getvalue() == "".join(f"{a}\n" for a in answers)
