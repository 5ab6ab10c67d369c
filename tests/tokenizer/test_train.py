"""The BPE trainer and `alignkit tokenizer train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.errors import ConfigError
from alignkit.tokenizer import Tokenizer, train_bpe
from tests.tokenizer.helpers import CORPUS, tiny_tokenizer

# Characters the training corpus never shows: they must still encode (as bytes) and decode back exactly.
UNSEEN = ["ꙮ ⸘ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "control \x00\x07\x1b chars", "🧬🦀 ZWJ 👩‍🔬", "  many    spaces\n\n\ttabs  ", "mixed 日本 and Ελληνικά"]


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_decode_encode_round_trips_any_text(template: str) -> None:
    tok = tiny_tokenizer(template)
    for text in CORPUS + UNSEEN:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    # Learned merges compress seen text: fewer tokens than UTF-8 bytes.
    assert len(tok.encode(CORPUS[4])) < len(CORPUS[4].encode("utf-8")) / 2


@pytest.mark.parametrize(
    ("template", "specials"),
    [
        ("chatml", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        ("llama3", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    ],
)
def test_special_tokens_are_single_ids(template: str, specials: list[str]) -> None:
    tok = train_bpe(CORPUS, vocab_size=400, special_tokens=["<tool>"], template=template)
    # Special tokens take the first ids, in order, then the user's extras.
    assert [tok.token_to_id(t) for t in [*specials, "<tool>"]] == list(range(len(specials) + 1))
    for index, token in enumerate([*specials, "<tool>"]):
        assert tok.encode(f"a{token}b") == [*tok.encode("a"), index, *tok.encode("b")]
    assert 256 + len(specials) + 1 <= tok.vocab_size <= 400
    assert tok.eos_token == {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[template]


def test_vocab_size_below_the_byte_alphabet_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 259"):
        train_bpe(CORPUS, vocab_size=200)
    with pytest.raises(ConfigError, match="'mistral'"):
        train_bpe(CORPUS, vocab_size=400, template="mistral")


def test_cli_trains_and_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(CORPUS[:3]) + "\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[3:]) + "\n\n", encoding="utf-8")
    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", "--input", str(txt), str(jsonl), "--vocab-size", "300",
               "--template", "llama3", "--output", str(out)])
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    tok = Tokenizer.from_dir(out)
    assert tok.vocab_size == 300 and tok.eos_token == "<|eot_id|>" and tok.add_bos_token
    assert tok.decode(tok.encode(CORPUS[3])) == CORPUS[3]
    assert tok.render_chat([{"role": "user", "content": "hi"}]).startswith("<|begin_of_text|><|start_header_id|>")


def test_cli_errors_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.txt"
    assert main(["tokenizer", "train", "--input", str(missing), "--vocab-size", "300", "--output",
                 str(tmp_path / "o")]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "no text"}\n', encoding="utf-8")
    assert main(["tokenizer", "train", "--input", str(bad), "--vocab-size", "300", "--output",
                 str(tmp_path / "o")]) == 2
    assert f"{bad}: record 2 has no string `text` field" in capsys.readouterr().err
