"""`Tokenizer`: a `tokenizers.Tokenizer` plus special tokens, a chat template and the SFT assistant mask.

Loading: `Tokenizer.from_dir` reads a Hugging Face `tokenizer.json` + `tokenizer_config.json`; `Tokenizer.from_gguf`
rebuilds the vocabulary a GGUF file stores in its metadata. `save` writes a directory that
`transformers.AutoTokenizer.from_pretrained` loads with the same ids and the same chat rendering.

The assistant mask (which tokens carry SFT loss) is computed from prefix renders of the conversation, so it works
with any chat template whose output for `messages[:i]` is a prefix of its output for `messages[:i+1]`; see
`apply_chat_template`.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from alignkit.errors import CheckpointError, ConfigError, DataError
from alignkit.tokenizer.templates import (
    TEMPLATE_SPECIAL_TOKENS,
    compile_template,
    default_template_name,
    get_template,
)

# Tokens that end a turn or a document in the formats we know; generation stops on any of them that the vocab has.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")

logger = logging.getLogger(__name__)


@dataclass
class ChatEncoding:
    """A tokenized conversation.

    `assistant_mask[k]` is True when token k carries SFT loss: the content of an assistant message and its
    end-of-turn token (`<|eot_id|>`, `<|im_end|>`; for ChatML also the "\\n" the template writes after `<|im_end|>`).
    System and user turns, the assistant header and other template glue are False. `message_index[k]` is the index of
    the message token k belongs to (its header included), -1 for glue outside any message (a leading BOS, a trailing
    generation prompt).
    """

    input_ids: list[int]
    assistant_mask: list[bool]
    message_index: list[int]
    text: str

    def __len__(self) -> int:
        return len(self.input_ids)


def _token_content(value: Any, where: str) -> str | None:
    """A special token as `tokenizer_config.json` writes it: a string, or a dict (an AddedToken) with "content"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"{where} is {value!r}; expected a token string or an object with a \"content\" string.")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or re-export it.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    return data


def _pick_chat_template(value: Any, where: str) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} (the "default" one is the chat template)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and "template" in t for t in value):
        if not value:
            return None
        by_name = {t.get("name"): t["template"] for t in value}
        return by_name.get("default", value[0]["template"])
    raise CheckpointError(
        f"`chat_template` in {where} must be a string or a list of {{\"name\", \"template\"}} objects, "
        f"found {type(value).__name__}."
    )


def _common_prefix_length(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Tokenizer:
    """Encode/decode text and render chats.

    Special tokens are strings that must be in the backend's vocabulary; any that the backend does not yet treat as
    special tokens are registered on it (in place), so they always encode as single ids. The `*_token_id` and
    `stop_token_ids` attributes are computed once, here.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        for key in SPECIAL_TOKEN_KEYS:
            token = getattr(self, key)
            if token is not None and backend.token_to_id(token) is None:
                raise ConfigError(f"{key} {token!r} is not in the tokenizer's vocabulary; add it or choose another.")
        # Special tokens must come out of `encode` whole, even when the backend only has them as ordinary vocab
        # entries: registering an existing token as special keeps its id and only changes how text is split.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in {bos_token, eos_token, pad_token, unk_token} - added if t is not None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(missing)])

        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else None
        if pad_token is not None:
            self.pad_token_id: int = self.backend.token_to_id(pad_token)
        else:
            # Padding positions are masked out of attention and loss, so any id works; EOS is the usual choice.
            self.pad_token_id = self.eos_token_id if self.eos_token_id is not None else 0
        stops = [self.eos_token_id] if self.eos_token_id is not None else []
        for token in END_OF_TURN_TOKENS:
            token_id = self.token_to_id(token)
            if token_id is not None and token_id not in stops:
                stops.append(token_id)
        self.stop_token_ids: list[int] = stops

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'built-in'})"
        )

    # ------------------------------------------------------------------ basics

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. With `add_special_tokens`, prepends BOS when the tokenizer is set to add it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        prefix = [self.bos_token_id] if add_special_tokens and self.add_bos_token and self.bos_token_id is not None else []
        return [prefix + e.ids for e in encodings]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def resolved_chat_template(self) -> str:
        """The checkpoint's chat template, or the built-in one its vocabulary fits (Llama 3 or ChatML)."""
        if self.chat_template is not None:
            return self.chat_template
        name = default_template_name(self)
        missing = [t for t in TEMPLATE_SPECIAL_TOKENS[name]["tokens"] if self.token_to_id(t) is None]
        # Without its control tokens a built-in template would still render, but every `<|im_end|>` would become
        # several ordinary tokens: nothing to stop generation on, and a model that never learns to end its turn.
        if name == "chatml" and {"<|im_start|>", "<|im_end|>"} & set(missing):
            raise ConfigError(
                "This tokenizer has no chat template and no <|im_start|>/<|im_end|> tokens for the built-in ChatML "
                "template; set `chat_template` in tokenizer_config.json, or train a tokenizer with chat tokens "
                "(`alignkit tokenizer train --template chatml`)."
            )
        return get_template(name)

    def _template_variables(self) -> dict[str, Any]:
        # transformers passes `special_tokens_map` plus tools/documents=None; templates test `tools is not none`,
        # which is True for an undefined variable, so None must be passed explicitly.
        variables: dict[str, Any] = {"tools": None, "documents": None}
        for key in SPECIAL_TOKEN_KEYS:
            token = getattr(self, key)
            if token is not None:
                variables[key] = token
        return variables

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as `transformers.apply_chat_template(..., tokenize=False)` renders it."""
        messages = _validate_messages(messages)
        template = compile_template(self.resolved_chat_template())
        return _render(template, messages, add_generation_prompt, self._template_variables())

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False
    ) -> ChatEncoding:
        """Render, tokenize once, and label every token with its message and whether it carries SFT loss.

        The loss span of assistant message i is the characters
        [len(render(messages[:i], add_generation_prompt=True)), len(render(messages[:i+1]))): its content plus its
        end-of-turn token, without the header the generation prompt already writes. A model that never learns to
        emit the end-of-turn token never stops, so that token is inside the loss. Tokens are assigned by the
        character their offset starts at. Only strings are rendered per prefix; the text is tokenized once.
        """
        messages = _validate_messages(messages)
        template = compile_template(self.resolved_chat_template())
        variables = self._template_variables()
        text = _render(template, messages, add_generation_prompt, variables)

        def prefix(count: int, generation: bool) -> str:
            return _render(template, messages[:count], generation, variables)

        n = len(messages)
        # prefixes[i] = render(messages[:i]); prefixes[n] is the whole conversation without a generation prompt.
        prefixes = [text if i == n and not add_generation_prompt else None for i in range(n + 1)]
        try:
            prefixes[0] = prefix(0, False)
        except DataError:
            prefixes[0] = ""  # templates that index messages[0] unconditionally cannot render an empty chat
        for i in range(1, n + 1):
            if prefixes[i] is None:
                prefixes[i] = prefix(i, False)

        # Message boundaries only label tokens (message_index), so a template that rewrites the text before a message
        # (Llama 3.1 folds the system prompt into its date header) still gets sensible labels: a message starts
        # where the prefix render and the full text part ways.
        starts = [_common_prefix_length(p, text) for p in prefixes]  # type: ignore[arg-type]
        for i in range(n):
            if starts[i + 1] < starts[i]:
                raise ConfigError(_prefix_error(i, "render(messages[:i+1]) shares less of the full text than "
                                                   "render(messages[:i])"))

        # Loss spans must be exact: both ends are checked against the full text.
        loss_spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            through = prefixes[i + 1]
            assert through is not None
            if not text.startswith(through):
                raise ConfigError(_prefix_error(i, "render(messages[:i+1]) is not a prefix of the full conversation"))
            header = prefix(i, True)
            if not through.startswith(header):
                raise ConfigError(_prefix_error(
                    i, "render(messages[:i], add_generation_prompt=True) is not a prefix of render(messages[:i+1]), "
                    "so the generation prompt differs from the header the template writes for an assistant turn"))
            loss_spans.append((len(header), len(through)))

        encoding = self.backend.encode(text, add_special_tokens=False)
        boundaries = starts  # message i covers [starts[i], starts[i+1]); before starts[0] or from starts[n] on: -1
        input_ids = encoding.ids
        assistant_mask = [False] * len(input_ids)
        message_index = [-1] * len(input_ids)
        span = 0
        for k, (start, _end) in enumerate(encoding.offsets):
            slot = bisect.bisect_right(boundaries, start) - 1
            if 0 <= slot < n:
                message_index[k] = slot
            while span < len(loss_spans) and start >= loss_spans[span][1]:
                span += 1
            if span < len(loss_spans) and loss_spans[span][0] <= start:
                assistant_mask[k] = True
        return ChatEncoding(input_ids=input_ids, assistant_mask=assistant_mask, message_index=message_index, text=text)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json` + `tokenizer_config.json` (+ `chat_template.jinja`, `special_tokens_map.json`)."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(
                f"{directory} has no tokenizer.json; alignkit loads fast (tokenizers-library) tokenizers only. "
                "Point at a Hugging Face model directory, or re-save the tokenizer with transformers' save_pretrained."
            )
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust library raises plain Exception subclasses
            raise CheckpointError(f"{tokenizer_file} cannot be parsed by the tokenizers library: {e}") from e

        config_file = directory / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        special = {key: _token_content(config.get(key), f"`{key}` in {config_file}") for key in SPECIAL_TOKEN_KEYS}
        map_file = directory / "special_tokens_map.json"
        if map_file.is_file():
            # Legacy file: transformers lets it override the config only when the config has no added_tokens_decoder.
            overrides = "added_tokens_decoder" not in config
            for key, value in _read_json(map_file).items():
                if key in special and (overrides or special[key] is None):
                    special[key] = _token_content(value, f"`{key}` in {map_file}")
        for key, token in special.items():
            if token is None or backend.token_to_id(token) is not None:
                continue
            if key in ("bos_token", "eos_token"):
                raise CheckpointError(
                    f"{key} {token!r} from {config_file} is not in the vocabulary of {tokenizer_file}; fix the config "
                    "or the tokenizer so they agree."
                )
            # transformers would append a missing pad/unk token, growing the vocabulary past the model's embedding;
            # padding falls back to EOS instead.
            logger.warning(f"{key} {token!r} from {config_file} is not in the vocabulary; ignoring it.")
            special[key] = None

        template_file = directory / "chat_template.jinja"
        if template_file.is_file():  # transformers >= 4.50 saves the template beside the config; it takes priority
            chat_template: str | None = template_file.read_text(encoding="utf-8")
        else:
            chat_template = _pick_chat_template(config.get("chat_template"), str(config_file))

        # transformers (v5) takes BOS from tokenizer.json's post-processor when there is one; older configs say it
        # with `add_bos_token`. Either adds BOS here.
        bos = special["bos_token"]
        adds_bos = False
        if bos is not None and backend.post_processor is not None:
            probe = backend.encode("", add_special_tokens=True).ids
            adds_bos = bool(probe) and probe[0] == backend.token_to_id(bos)
        add_bos_token = adds_bos or bool(config.get("add_bos_token", False))
        return cls(backend, chat_template=chat_template, add_bos_token=add_bos_token, **special)

    @classmethod
    def from_gguf(cls, reader: Any, *, source: str) -> Tokenizer:
        """Rebuild the tokenizer a GGUF stores in its metadata (`reader` is a `gguf.GGUFReader`; `source` is the path,
        used in error messages). Byte-level BPE vocabularies only (Llama 3, Qwen2, SmolLM, GPT-2)."""
        from alignkit.tokenizer.gguf_vocab import build_from_gguf

        parts = build_from_gguf(reader, source=source)
        return cls(
            parts.backend, bos_token=parts.bos_token, eos_token=parts.eos_token, pad_token=parts.pad_token,
            unk_token=parts.unk_token, chat_template=parts.chat_template, add_bos_token=parts.add_bos_token,
        )

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` for `from_dir` and `transformers.AutoTokenizer`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        backend = BackendTokenizer.from_str(self.backend.to_str())
        # BOS is written into the post-processor because that is where transformers (v5) reads it from; the config's
        # `add_bos_token` says the same for older readers.
        adds_bos = self.add_bos_token and self.bos_token_id is not None
        if backend.post_processor is not None:
            probe = backend.encode("", add_special_tokens=True).ids
            current = bool(probe) and probe[0] == self.bos_token_id
            if current != adds_bos or len(probe) > int(current):
                backend.post_processor = None
        if adds_bos and backend.post_processor is None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{self.bos_token}:0 $A:0",
                pair=f"{self.bos_token}:0 $A:0 {self.bos_token}:1 $B:1",
                special_tokens=[(self.bos_token, self.bos_token_id)],
            )
        backend.save(str(out / "tokenizer.json"))

        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": bool(adds_bos),
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                    "single_word": t.single_word, "special": t.special,
                }
                for i, t in sorted(backend.get_added_tokens_decoder().items())
            },
        }
        for key in SPECIAL_TOKEN_KEYS:
            token = getattr(self, key)
            if token is not None:
                config[key] = token
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")


def _prefix_error(index: int, what: str) -> str:
    return (
        f"The chat template cannot be used for assistant masks: for message {index}, {what}. alignkit finds each "
        "message's tokens by rendering conversation prefixes, which needs a template whose output for messages[:i] is "
        "a prefix of its output for messages[:i+1] (templates that rewrite earlier turns, e.g. by dropping past "
        "reasoning, break this). Use a built-in template (`chatml` or `llama3`) or simplify the template."
    )


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"A chat must be a non-empty list of messages, got {messages!r:.200}.")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"Message {index} of the chat is a {type(message).__name__}, not a dict with "
                            "\"role\" and \"content\".")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"Message {index} of the chat has no {key!r} key (keys: {sorted(message)}); every "
                                "message needs \"role\" and \"content\".")
            if not isinstance(message[key], str):
                raise DataError(f"Message {index} of the chat has a {type(message[key]).__name__} {key!r}; "
                                "it must be a string.")
        # As transformers does: drop None-valued keys, which templates handle better absent than as "None".
        clean.append({k: v for k, v in message.items() if v is not None})
    return clean


def _render(template: jinja2.Template, messages: list[dict[str, Any]], add_generation_prompt: bool,
            variables: dict[str, Any]) -> str:
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        roles = [m.get("role") for m in messages]
        raise DataError(f"The chat template rejected a conversation with roles {roles}: {e}") from e
