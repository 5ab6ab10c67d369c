"""Chat rendering (byte-exact, and identical to transformers) and the SFT assistant mask."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.errors import ConfigError, DataError, UserError
from alignkit.tokenizer import (
    CHATML_TEMPLATE,
    LLAMA3_TEMPLATE,
    Tokenizer,
    default_template_for,
    get_template,
)
from tests.tokenizer.helpers import CONVERSATION, tiny_tokenizer

transformers = pytest.importorskip("transformers")

LLAMA3_EXPECTED = (
    "<|begin_of_text|>"
    "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4, of course.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd café × 3?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nThree cafés.<|eot_id|>"  # content is strip()ped
)
CHATML_EXPECTED = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4, of course.<|im_end|>\n"
    "<|im_start|>user\nAnd café × 3?<|im_end|>\n"
    "<|im_start|>assistant\n  Three cafés.\n<|im_end|>\n"  # ChatML keeps content verbatim
)
GENERATION_PROMPT = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "chatml": "<|im_start|>assistant\n"}

# Meta's own Llama 3 Instruct template (Meta-Llama-3-8B-Instruct tokenizer_config.json), the reference for ours.
META_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# The built-in templates with HF's `{% generation %}` markers around what we put in the loss, so transformers'
# `return_assistant_tokens_mask` gives an independent reference mask.
TAGGED = {
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
        "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}"
        "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
EXPECTED = {"llama3": LLAMA3_EXPECTED, "chatml": CHATML_EXPECTED}
TEMPLATE_NAMES = ["llama3", "chatml"]


def hf_twin(tokenizer: Tokenizer, tmp_path: Path) -> object:
    tokenizer.save(tmp_path / "tok")
    return transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_render_is_byte_exact(name: str) -> None:
    tok = tiny_tokenizer(name)
    assert tok.render_chat(CONVERSATION) == EXPECTED[name]
    prompt = CONVERSATION[:4]
    expected_prompt = EXPECTED[name][: EXPECTED[name].rindex(GENERATION_PROMPT[name])] + GENERATION_PROMPT[name]
    assert tok.render_chat(prompt, add_generation_prompt=True) == expected_prompt


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_render_and_ids_match_transformers(name: str, tmp_path: Path) -> None:
    tok = tiny_tokenizer(name)
    hf = hf_twin(tok, tmp_path)
    conversations = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[:4], [{"role": "user", "content": " 🤖 <|im_end|> x "}]]
    for messages in conversations:
        for generation in (False, True):
            ours = tok.apply_chat_template(messages, add_generation_prompt=generation)
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=generation)
            assert ours.text == text == tok.render_chat(messages, add_generation_prompt=generation)
            assert ours.input_ids == ids["input_ids"]


def test_llama3_matches_metas_template() -> None:
    """Ours writes BOS before the loop, Meta's inside it on the first message: same text for any non-empty chat."""
    tok = tiny_tokenizer("llama3")
    meta = Tokenizer(tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token, chat_template=META_LLAMA3_TEMPLATE)
    for messages in (CONVERSATION, CONVERSATION[1:2], CONVERSATION[1:3]):
        for generation in (False, True):
            assert tok.render_chat(messages, add_generation_prompt=generation) == meta.render_chat(
                messages, add_generation_prompt=generation
            )


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_assistant_mask_token_by_token(name: str) -> None:
    tok = tiny_tokenizer(name)
    enc = tok.apply_chat_template(CONVERSATION)
    assert len(enc.input_ids) == len(enc.assistant_mask) == len(enc.message_index) == len(enc)
    eot = "<|eot_id|>" if name == "llama3" else "<|im_end|>\n"
    # Hand-located loss spans: exactly each assistant turn's content (stripped for Llama 3) + its end-of-turn.
    assistant_text = {2: "4, of course." + eot, 4: ("Three cafés." if name == "llama3" else "  Three cafés.\n") + eot}
    headers = {"llama3": "<|start_header_id|>{}<|end_header_id|>\n\n", "chatml": "<|im_start|>{}\n"}[name]
    for index, message in enumerate(CONVERSATION):
        tokens = [t for t, i in zip(enc.input_ids, enc.message_index) if i == index]
        masks = [m for m, i in zip(enc.assistant_mask, enc.message_index) if i == index]
        turn = tok.decode(tokens, skip_special_tokens=False)
        header = headers.format(message["role"])
        assert turn.startswith(header)
        if message["role"] == "assistant":
            loss = tok.decode([t for t, m in zip(tokens, masks) if m], skip_special_tokens=False)
            assert loss == assistant_text[index]
            assert turn == header + assistant_text[index]
            # the mask is one contiguous run at the end of the turn: header False, then content + end-of-turn True
            first = masks.index(True)
            assert masks == [False] * first + [True] * (len(masks) - first)
            assert tok.decode(tokens[:first], skip_special_tokens=False) == header
            end_token = tok.token_to_id("<|eot_id|>" if name == "llama3" else "<|im_end|>")
            assert end_token in [t for t, m in zip(tokens, masks) if m]
        else:
            assert not any(masks)
    unlabelled = [t for t, i in zip(enc.input_ids, enc.message_index) if i == -1]
    assert unlabelled == ([tok.bos_token_id] if name == "llama3" else [])


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_assistant_mask_matches_transformers_generation_tags(name: str, tmp_path: Path) -> None:
    tok = tiny_tokenizer(name)
    hf = hf_twin(tok, tmp_path)
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[:4]):
        for generation in (False, True):
            ours = tok.apply_chat_template(messages, add_generation_prompt=generation)
            ref = hf.apply_chat_template(
                messages, chat_template=TAGGED[name], tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True, add_generation_prompt=generation,
            )
            assert ours.input_ids == ref["input_ids"]
            assert [int(m) for m in ours.assistant_mask] == ref["assistant_masks"]


def test_generation_prompt_is_unlabelled_glue() -> None:
    tok = tiny_tokenizer("chatml")
    enc = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)
    tail = tok.encode("<|im_start|>assistant\n")
    assert enc.input_ids[-len(tail):] == tail
    assert enc.message_index[-len(tail):] == [-1] * len(tail)
    assert not any(enc.assistant_mask)


def test_templates_that_rewrite_the_system_prompt_still_label_messages() -> None:
    """A Llama 3.1-style template writes a system header even for an empty chat and folds the system message into
    it: render([]) is not a prefix of render([system]). Message labels fall back to where the renders part ways."""
    template = (
        "{{ bos_token }}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nDate: today\\n\\n' }}"
        "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
        "{% set rest = messages[1:] %}{% else %}{% set rest = messages %}{% endif %}{{ '<|eot_id|>' }}"
        "{% for message in rest %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    )
    base = tiny_tokenizer("llama3")
    tok = Tokenizer(base.backend, bos_token=base.bos_token, eos_token=base.eos_token, chat_template=template)
    enc = tok.apply_chat_template(CONVERSATION[:3])
    system = tok.decode([t for t, i in zip(enc.input_ids, enc.message_index) if i == 0], skip_special_tokens=False)
    assert system == "You are terse.<|eot_id|>"
    loss = tok.decode([t for t, m in zip(enc.input_ids, enc.assistant_mask) if m], skip_special_tokens=False)
    assert loss == "4, of course.<|eot_id|>"


def test_template_that_rewrites_earlier_turns_is_refused() -> None:
    # Writes the number of messages first, so no prefix render is a prefix of the full conversation.
    template = "{{ messages | length }}" + CHATML_TEMPLATE
    base = tiny_tokenizer("chatml")
    tok = Tokenizer(base.backend, eos_token="<|im_end|>", chat_template=template)
    with pytest.raises(ConfigError, match="message 2.*not a prefix"):
        tok.apply_chat_template(CONVERSATION)


def test_generation_prompt_unlike_assistant_header_is_refused() -> None:
    template = CHATML_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>'")
    base = tiny_tokenizer("chatml")
    tok = Tokenizer(base.backend, eos_token="<|im_end|>", chat_template=template)
    with pytest.raises(ConfigError, match="add_generation_prompt=True"):
        tok.apply_chat_template(CONVERSATION)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ({"content": "hi"}, "Message 1 .*'role'"),
        ({"role": "user"}, "Message 1 .*'content'"),
        ({"role": "user", "content": ["a", "b"]}, "Message 1 .*list 'content'"),
        ("hi", "Message 1 .*str"),
    ],
)
def test_malformed_messages_name_the_index(message: object, match: str) -> None:
    tok = tiny_tokenizer("chatml")
    with pytest.raises(UserError, match=match):
        tok.apply_chat_template([{"role": "user", "content": "ok"}, message])  # type: ignore[list-item]
    with pytest.raises(UserError, match=match):
        tok.render_chat([{"role": "user", "content": "ok"}, message])  # type: ignore[list-item]


def test_template_raise_exception_becomes_data_error() -> None:
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    base = tiny_tokenizer("chatml")
    tok = Tokenizer(base.backend, eos_token="<|im_end|>", chat_template=template + CHATML_TEMPLATE)
    with pytest.raises(DataError, match="first must be user"):
        tok.render_chat(CONVERSATION)


def test_builtin_template_selection() -> None:
    llama, chatml = tiny_tokenizer("llama3"), tiny_tokenizer("chatml")
    assert default_template_for(llama) == LLAMA3_TEMPLATE == get_template("llama3")
    assert default_template_for(chatml) == CHATML_TEMPLATE == get_template("chatml")
    with pytest.raises(ConfigError, match="'mistral'"):
        get_template("mistral")
    # No checkpoint template: the built-in one the vocabulary fits is used.
    bare = Tokenizer(llama.backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert bare.chat_template is None
    assert bare.render_chat(CONVERSATION) == LLAMA3_EXPECTED


def test_builtin_chatml_needs_its_tokens() -> None:
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models, pre_tokenizers

    backend = BackendTokenizer(models.BPE({"a": 0, "b": 1}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    with pytest.raises(ConfigError, match="no chat template"):
        Tokenizer(backend).render_chat([{"role": "user", "content": "a"}])


def test_tojson_does_not_html_escape() -> None:
    base = tiny_tokenizer("chatml")
    tok = Tokenizer(base.backend, chat_template="{{ messages[0] | tojson }}")
    assert tok.render_chat([{"role": "user", "content": "<b>&'"}]) == '{"role": "user", "content": "<b>&\'"}'
