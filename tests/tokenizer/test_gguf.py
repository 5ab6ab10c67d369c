"""Tokenizers rebuilt from GGUF metadata: the real SmolLM2 file, and small GGUFs written here for other
pre-tokenizers. The reference is `transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)`."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from alignkit.errors import CheckpointError
from alignkit.tokenizer import Tokenizer
from tests.conftest import smollm2_gguf_path
from tests.tokenizer.helpers import CONVERSATION, tiny_tokenizer

gguf = pytest.importorskip("gguf")

STRINGS = [
    "Hello world!",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\n",
    "12345678 and 3.14159 and 1,000,000",
    "x² + y³ = z⁴, ½ ⅓",
    "日本語のテキスト、中文文本",
    "emoji 🤖🎉 👍🏽 family 👨‍👩‍👧",
    "Ünïcödé façade naïve",
    "def f(x):\n    return x**2  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "I'm you're they'll we'd IT'S",
    "   \n  \t ",
    "",
    "a" * 40,
    "مرحبا بالعالم",
    "Привет, мир",
    "<|endoftext|>text<|endoftext|>",
    "price: $1,000.00!!! (approx.)",
    "camelCaseVariable_name123 snake_case",
    "\r\nwindows\r\nlines",
]


@functools.lru_cache(maxsize=1)
def _smollm2() -> tuple[Tokenizer, str]:
    path = smollm2_gguf_path()
    assert path is not None
    return Tokenizer.from_gguf(gguf.GGUFReader(path), source=path), path


@pytest.fixture
def smollm2(smollm2_gguf: str) -> tuple[Tokenizer, str]:
    return _smollm2()


def test_smollm2_gguf_ids_and_special_tokens(smollm2: tuple[Tokenizer, str]) -> None:
    """Expected ids are what transformers 5 gives for the same GGUF (checked live in the slow test below)."""
    tok, _ = smollm2
    assert tok.vocab_size == 49152
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"
    )
    assert tok.stop_token_ids == [2, 0] and not tok.add_bos_token
    assert tok.encode("Hello world!") == [19556, 905, 17]
    assert tok.encode("x = 12345 # ünïcödé 日本") == [
        104, 446, 216, 33, 34, 35, 36, 37, 907, 5549, 137, 94, 25972, 83, 7466, 84, 2756, 17097, 241, 115, 40993
    ]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    enc = tok.apply_chat_template(messages)
    assert enc.input_ids == [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
        198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198, 36, 30, 2, 198,
    ]
    # The template's default system prompt is inserted before the first user message, so it is labelled message 0.
    assert enc.message_index[0] == 0 and enc.message_index[-1] == 1
    assert tok.decode([t for t, m in zip(enc.input_ids, enc.assistant_mask) if m], skip_special_tokens=False) == (
        "4.<|im_end|>\n"
    )


def with_smollm_pre_tokenizer(hf: object) -> object:
    """transformers' GGUF converter gives every "gpt2"-model file GPT-2's split, but SmolLM's own tokenizer.json and
    llama.cpp (pre "smollm") first split every numeric character off (so " ½" is " " + "½", never "Ġ½"). We follow
    the model's tokenizer; this puts the same split on transformers' tokenizer so the rest can be compared."""
    from tokenizers import pre_tokenizers

    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(  # type: ignore[attr-defined]
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return hf


def space_before_numeric(text: str) -> bool:
    return any(a.isspace() and b.isnumeric() for a, b in zip(text, text[1:]))


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2: tuple[Tokenizer, str], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok, path = smollm2
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert len(hf) == tok.vocab_size
    raw = [tok.encode(text) == hf.encode(text, add_special_tokens=False) for text in STRINGS]
    # Identical wherever the two splits agree; they disagree on this file only for "x² + y³ = z⁴, ½ ⅓".
    assert [text for text, same in zip(STRINGS, raw) if not same] == ["x² + y³ = z⁴, ½ ⅓"]
    assert all(same for text, same in zip(STRINGS, raw) if not space_before_numeric(text))
    with_smollm_pre_tokenizer(hf)
    for text in STRINGS:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == hf.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False) == text
    for messages in (CONVERSATION, CONVERSATION[1:3]):
        for generation in (False, True):
            assert tok.render_chat(messages, add_generation_prompt=generation) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation
            )
            assert tok.apply_chat_template(messages, add_generation_prompt=generation).input_ids == (
                hf.apply_chat_template(messages, add_generation_prompt=generation, return_dict=True)["input_ids"]
            )
    # ... and a saved copy loads in transformers with the same ids and rendering.
    tok.save(tmp_path)
    saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in STRINGS:
        assert saved.encode(text, add_special_tokens=False) == tok.encode(text), text
    assert saved.apply_chat_template(CONVERSATION, tokenize=False) == tok.render_chat(CONVERSATION)
    # A directory transformers itself saves (v5 layout: chat_template.jinja beside the config) loads here too.
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded = Tokenizer.from_dir(tmp_path / "hf")
    assert loaded.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)


def write_tokenizer_gguf(source: Tokenizer, path: Path, *, pre: str, model: str = "gpt2") -> None:
    """A GGUF holding only `source`'s vocabulary (as llama.cpp's converter writes it) and one dummy tensor."""
    writer = gguf.GGUFWriter(str(path), "llama")
    vocab = source.backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    control = set(source.backend.get_added_tokens_decoder())
    merges = json.loads(source.backend.to_str())["model"]["merges"]
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in control else 1 for i in range(len(tokens))])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    if source.bos_token_id is not None:
        writer.add_bos_token_id(source.bos_token_id)
    writer.add_eos_token_id(source.eos_token_id)
    writer.add_add_bos_token(source.add_bos_token)
    writer.add_chat_template(source.chat_template)
    writer.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("template", "pre"), [("llama3", "llama-bpe"), ("chatml", "gpt2"), ("chatml", "qwen2"),
                                               ("chatml", "smollm")])
def test_written_gguf_matches_transformers(template: str, pre: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    source = tiny_tokenizer(template)
    write_tokenizer_gguf(source, tmp_path / "tiny.gguf", pre=pre)
    tok = Tokenizer.from_gguf(gguf.GGUFReader(str(tmp_path / "tiny.gguf")), source="tiny.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    if pre == "smollm":
        with_smollm_pre_tokenizer(hf)
    assert (tok.bos_token, tok.eos_token, tok.add_bos_token) == (source.bos_token, source.eos_token,
                                                                  source.add_bos_token)
    for text in STRINGS:
        ids = tok.encode(text)
        if template == "llama3" and "<|endoftext|>" in text:
            # transformers' GGUF converter appends GPT-2's default "<|endoftext|>" special token when the vocab
            # lacks it (a new id past the model's vocabulary); we leave the text as text.
            assert tok.token_to_id("<|endoftext|>") is None
        else:
            assert ids == hf.encode(text, add_special_tokens=False), (pre, text)
        assert tok.decode(ids, skip_special_tokens=False) == text
        if pre in ("llama-bpe", "gpt2"):  # the source tokenizer splits text the same way
            assert ids == source.encode(text), (pre, text)
    assert tok.render_chat(CONVERSATION) == hf.apply_chat_template(CONVERSATION, tokenize=False)
    if pre in ("llama-bpe", "gpt2"):
        assert tok.apply_chat_template(CONVERSATION) == source.apply_chat_template(CONVERSATION)


def write_sentencepiece_gguf(path: Path, *, architecture: str = "llama") -> None:
    """A Llama-2-style SentencePiece vocabulary: <unk>/<s>/</s>, 256 byte tokens, then scored pieces."""
    pieces = ["\u2581", "\u2581t", "he", "\u2581the", "\u2581c", "at", "\u2581cat", "\u2581s", "\u2581sat",
              "\u2581o", "n", "\u2581on", "\u2581m", "\u2581mat", "\u2581\u2581", "e", "a", "t", "h", "c", "s",
              "o", "m", "\u2581a", "\u2581h", "el", "lo", "\u2581hel", "\u2581hello", "l", "!", "1", "2", "é",
              "<|im_start|>", "<|im_end|>"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    scores = [0.0, 0.0, 0.0, *([0.0] * 256), *(-float(i) for i in range(len(pieces)))]
    types = [2, 3, 3, *([6] * 256), *(3 if p.startswith("<|") else 1 for p in pieces)]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    write_sentencepiece_gguf(tmp_path / "spm.gguf")
    tok = Tokenizer.from_gguf(gguf.GGUFReader(str(tmp_path / "spm.gguf")), source="spm.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.add_bos_token) == ("<s>", "</s>", "<unk>", True)
    texts = ["the cat sat on the mat", "hello!  the  cat", " leading", "é 12 ñ 日本 🤖", "<|im_start|>hello<|im_end|>",
             "line\nbreak", ""]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == hf.encode(text) == [1, *ids]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    # Unknown characters fall back to their UTF-8 bytes, so text still round-trips.
    assert [tok.id_to_token(i) for i in tok.encode("the ñ")] == ["\u2581the", "\u2581", "<0xC3>", "<0xB1>"]
    assert tok.decode(tok.encode("the cat ñ 🤖")) == "the cat ñ 🤖"


def test_unsupported_gguf_tokenizers_are_refused(tmp_path: Path) -> None:
    source = tiny_tokenizer("chatml")
    write_tokenizer_gguf(source, tmp_path / "odd_pre.gguf", pre="some-new-model")
    with pytest.raises(CheckpointError, match="odd_pre.gguf.*'some-new-model'"):
        Tokenizer.from_gguf(gguf.GGUFReader(str(tmp_path / "odd_pre.gguf")), source=str(tmp_path / "odd_pre.gguf"))
    write_tokenizer_gguf(source, tmp_path / "t5.gguf", pre="default", model="t5")
    with pytest.raises(CheckpointError, match="t5.gguf.*'t5' tokenizer"):
        Tokenizer.from_gguf(gguf.GGUFReader(str(tmp_path / "t5.gguf")), source=str(tmp_path / "t5.gguf"))
    write_sentencepiece_gguf(tmp_path / "gemma.gguf", architecture="gemma")
    with pytest.raises(CheckpointError, match="'llama' tokenizer .* for architecture 'gemma'"):
        Tokenizer.from_gguf(gguf.GGUFReader(str(tmp_path / "gemma.gguf")), source=str(tmp_path / "gemma.gguf"))
