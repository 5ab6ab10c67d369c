"""Loading from a Hugging Face directory, saving for transformers, and the special-token contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.errors import CheckpointError, UserError
from alignkit.tokenizer import Tokenizer
from tests.tokenizer.helpers import CONVERSATION, tiny_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world, it's 10:30!",
    "  leading and trailing   ",
    "tabs\tand\nnew\n\nlines",
    "Ünïcödé 日本語 🤖 ꙮ",
    "<|im_start|>user\nhi<|im_end|><|eot_id|>",
    "",
]


def test_from_dir_without_tokenizer_json_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_with_broken_config_names_the_file(tmp_path: Path) -> None:
    tiny_tokenizer("chatml").save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_save_from_dir_round_trip(name: str, tmp_path: Path) -> None:
    tok = tiny_tokenizer(name)
    tok.save(tmp_path)
    back = Tokenizer.from_dir(tmp_path)
    for attr in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id",
                 "stop_token_ids", "vocab_size", "chat_template", "add_bos_token"):
        assert getattr(back, attr) == getattr(tok, attr), attr
    for text in TEXTS:
        for special in (False, True):
            assert back.encode(text, add_special_tokens=special) == tok.encode(text, add_special_tokens=special)
    assert back.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_saved_directory_loads_in_transformers_with_same_ids(name: str, tmp_path: Path) -> None:
    tok = tiny_tokenizer(name)
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert hf.eos_token_id == tok.eos_token_id and hf.pad_token_id == tok.pad_token_id
    for text in TEXTS:
        for special in (False, True):
            ids = tok.encode(text, add_special_tokens=special)
            assert hf.encode(text, add_special_tokens=special) == ids, (text, special)
            assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)
            assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)
    assert hf.apply_chat_template(CONVERSATION, tokenize=False) == tok.render_chat(CONVERSATION)


def test_special_tokens_and_stop_ids() -> None:
    llama, chatml = tiny_tokenizer("llama3"), tiny_tokenizer("chatml")
    ids = {t: llama.token_to_id(t) for t in ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>")}
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id) == (
        ids["<|begin_of_text|>"], ids["<|eot_id|>"], ids["<|end_of_text|>"]
    )
    assert llama.stop_token_ids == [ids["<|eot_id|>"], ids["<|end_of_text|>"]]
    assert chatml.bos_token_id is None
    assert chatml.stop_token_ids == [chatml.token_to_id("<|im_end|>"), chatml.token_to_id("<|endoftext|>")]
    # BOS only where the tokenizer adds one, and only when asked.
    assert llama.encode("hi", add_special_tokens=True) == [llama.bos_token_id, *llama.encode("hi")]
    assert chatml.encode("hi", add_special_tokens=True) == chatml.encode("hi")
    # Pad falls back to EOS.
    bare = Tokenizer(chatml.backend, eos_token="<|im_end|>")
    assert bare.pad_token_id == bare.eos_token_id == chatml.token_to_id("<|im_end|>")
    # Special tokens in text are single ids, and decode drops them unless asked not to.
    ids_ = chatml.encode("<|im_start|>hi<|im_end|>")
    assert ids_[0] == chatml.token_to_id("<|im_start|>") and ids_[-1] == chatml.eos_token_id
    assert chatml.decode(ids_) == "hi"
    assert chatml.vocab_size == chatml.backend.get_vocab_size(with_added_tokens=True)


def test_from_dir_reads_hf_config_variants(tmp_path: Path) -> None:
    """Special tokens as AddedToken dicts, `chat_template` as a named list, special_tokens_map.json, and a
    chat_template.jinja file (which takes priority, as in transformers)."""
    tiny_tokenizer("chatml").save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"], config["pad_token"]
    config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "special": True}
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|endoftext|>"}}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.chat_template == "DEFAULT"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert Tokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "x"}]) == "x"


def test_from_dir_reads_bos_from_post_processor(tmp_path: Path) -> None:
    """transformers v5 ignores `add_bos_token` in the config when tokenizer.json has a post-processor; so do we."""
    tiny_tokenizer("llama3").save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.add_bos_token
    assert tok.encode("hi", add_special_tokens=True) == hf.encode("hi") == [tok.bos_token_id, *tok.encode("hi")]
