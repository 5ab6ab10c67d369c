"""Chat templates: the built-in Llama 3 and ChatML formats, and jinja rendering the way `transformers` does it.

A chat template is a jinja program from a checkpoint's `tokenizer_config.json` (or a GGUF's `tokenizer.chat_template`)
that turns `messages` into one string. We compile it in the same sandboxed environment `transformers` uses
(`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`, `raise_exception`, `strftime_now`, a `tojson` that
does not HTML-escape), so a template renders byte-identically here and in `transformers.apply_chat_template`.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from alignkit.errors import ConfigError

if TYPE_CHECKING:
    from alignkit.tokenizer.tokenizer import Tokenizer

# Meta's Llama 3 Instruct format. Content is `trim`med exactly as in Meta's template. Meta's 3.0 template writes
# `bos_token` inside the loop on the first message; we write it before the loop (as Llama 3.1+ templates do), which
# renders the same string for every non-empty conversation and lets an empty prefix render to just the BOS, so the
# BOS is template glue (message_index -1) when masks are computed from prefix renders.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# ChatML (Qwen, SmolLM2, OpenHermes, ...): no BOS, each turn is `<|im_start|>{role}\n{content}<|im_end|>\n`.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEMPLATES: dict[str, str] = {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE}

# The special tokens each built-in format needs as single tokens in the vocabulary, and which of them play the
# roles of BOS / EOS / PAD when a tokenizer is trained for that format. EOS is the end-of-turn token, so generation
# stops at the end of an assistant turn; PAD is the end-of-document token, distinct from EOS.
TEMPLATE_SPECIAL_TOKENS: dict[str, dict[str, Any]] = {
    "llama3": {
        "tokens": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|end_of_text|>",
    },
    "chatml": {
        "tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    },
}


def get_template(name: str) -> str:
    """The jinja source of a built-in template: "llama3" or "chatml"."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(
            f"Unknown chat template name {name!r}; the built-in templates are {sorted(TEMPLATES)}."
        ) from None


def set_chat_template(tokenizer: Tokenizer, template: str | None) -> None:
    """Give `tokenizer` a chat template: "llama3" / "chatml" (built in) or a jinja string; None keeps its own."""
    if template is not None:
        tokenizer.chat_template = TEMPLATES[template] if template in TEMPLATES else template


def default_template_for(tokenizer: Tokenizer) -> str:
    """The built-in template a checkpoint without a chat template gets: Llama 3 if its vocabulary has
    `<|start_header_id|>`, else ChatML."""
    name = default_template_name(tokenizer)
    return TEMPLATES[name]


def default_template_name(tokenizer: Tokenizer) -> str:
    return "llama3" if tokenizer.token_to_id("<|start_header_id|>") is not None else "chatml"


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (HF's assistant-mask markers) and render the body unchanged.

    We compute assistant masks from prefix renders instead, but templates that carry the markers must still compile.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # jinja's own `tojson` HTML-escapes `<`, `>`, `&` and `'`; chat templates expect plain JSON (as in transformers).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile (once per distinct source) a chat template in the sandbox transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(
            f"The chat template does not compile: {e.message} (template line {e.lineno}); fix `chat_template` in "
            "tokenizer_config.json or pass a valid jinja template."
        ) from e
