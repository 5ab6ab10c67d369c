"""The OpenAI wire format: request validation and response objects, as pure functions (no web framework here).

Validation is strict on purpose. A field the server does not implement (`presence_penalty: 0.5`, `tools`, ...) is a
400 that names it, never silently ignored: a client that asked for a penalty and got none would draw wrong
conclusions from the answers. Fields sent at their no-op value (`presence_penalty: 0`, `echo: false`) are accepted,
because common clients send them by default. Every error is an `APIError`, which becomes OpenAI's error object
`{"error": {"message", "type", "param", "code"}}` with a 4xx status.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from alignkit.errors import ConfigError, UserError
from alignkit.generation.sampling import SamplingParams

Kind = Literal["chat", "completion"]

# OpenAI's temperature range; a higher one is almost always a client bug (a percentage instead of a fraction).
MAX_TEMPERATURE = 2.0
# OpenAI allows up to 4 stop sequences.
MAX_STOP = 4


class APIError(Exception):
    """An error the client caused (4xx) or the server hit (5xx), in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ServerLimits:
    """What the loaded model and the server's settings allow; requests are checked against these."""

    model_name: str
    context_length: int
    vocab_size: int
    max_n: int


@dataclass
class ParsedRequest:
    """A validated request: the prompt as token ids and everything the response needs."""

    kind: Kind
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: bool
    model: str
    # Chat only: the rendered prompt, for debugging and the page's tests.
    prompt_text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- field checks

def _type_name(value: Any) -> str:
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                         list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _integer(body: dict[str, Any], name: str, *, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    # JSON has one number type; 3.0 is a fine integer, 3.5 and true are not.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer; got {_type_name(value)} {json.dumps(value)[:50]}.", name)
    if low is not None and value < low:
        raise invalid(f"'{name}' must be at least {low}; got {value}.", name)
    if high is not None and value > high:
        raise invalid(f"'{name}' must be at most {high}; got {value}.", name)
    return value


def _number(body: dict[str, Any], name: str, *, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"'{name}' must be a number; got {_type_name(value)} {json.dumps(value)[:50]}.", name)
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise invalid(f"'{name}' must be in {bracket}{low:g}, {high:g}]; got {value}.", name)
    return float(value)


def _boolean(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false; got {_type_name(value)} {json.dumps(value)[:50]}.", name)
    return value


def _stop(body: dict[str, Any]) -> list[str] | None:
    value = body.get("stop")
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"'stop' must be a string or an array of strings; got {_type_name(value)}.", "stop")
    if len(stops) > MAX_STOP:
        raise invalid(f"'stop' has {len(stops)} sequences; at most {MAX_STOP} are allowed.", "stop")
    stops = [s for s in stops if s]  # OpenAI ignores empty stop strings; SamplingParams rejects them
    return stops or None


# Fields accepted only at the value that means "off": clients such as LangChain send them by default.
_NO_OP_FIELDS: dict[str, Callable[[Any], bool]] = {
    "presence_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "frequency_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "logit_bias": lambda v: v == {},
    "top_logprobs": lambda v: v == 0 and not isinstance(v, bool),
    "echo": lambda v: v is False,
    "best_of": lambda v: v == 1 and not isinstance(v, bool),
    "parallel_tool_calls": lambda v: isinstance(v, bool),
    "tools": lambda v: v == [],
}
_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "stream",
                  "stream_options", "user", "top_k", "min_p", "repetition_penalty", "ignore_eos"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt"}


def _check_fields(body: dict[str, Any], supported: set[str]) -> None:
    unsupported = []
    for name, value in body.items():
        if name in supported or value is None:
            continue
        if name in _NO_OP_FIELDS and _NO_OP_FIELDS[name](value):
            continue
        unsupported.append(name)
    if unsupported:
        listed = ", ".join(f"'{n}'" for n in unsupported)
        raise invalid(
            f"This server does not support {listed}. Supported fields: {', '.join(sorted(supported))}"
            f" (and {', '.join(sorted(_NO_OP_FIELDS))} at their default values).",
            unsupported[0], "unsupported_field")


# ---------------------------------------------------------------- requests

def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw.strip():
        raise invalid("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise invalid("The request body is not UTF-8 text; send a JSON object.", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise invalid(f"The request body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).",
                      code="invalid_json") from None
    except RecursionError:
        raise invalid("The request body nests too deeply to parse.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(f"The request body must be a JSON object; got {_type_name(body)}.", code="invalid_json")
    return body


def _sampling(body: dict[str, Any], limits: ServerLimits, prompt_length: int, max_tokens: int | None,
              max_tokens_name: str) -> SamplingParams:
    """SamplingParams from the fields every endpoint shares, with the context-window check."""
    room = limits.context_length - prompt_length
    if room < 1:
        raise invalid(
            f"The prompt has {prompt_length} tokens, which leaves no room in this model's context window of "
            f"{limits.context_length} tokens; shorten the prompt.", "messages" if "messages" in body else "prompt",
            "context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise invalid(
            f"This model's maximum context length is {limits.context_length} tokens; you requested "
            f"{prompt_length + max_tokens} ({prompt_length} in the prompt, {max_tokens} in '{max_tokens_name}'). "
            f"Lower '{max_tokens_name}' to at most {room}.", max_tokens_name, "context_length_exceeded")
    temperature = _number(body, "temperature", low=0.0, high=MAX_TEMPERATURE)
    top_p = _number(body, "top_p", low=0.0, high=1.0, low_open=True)
    min_p = _number(body, "min_p", low=0.0, high=1.0)
    penalty = _number(body, "repetition_penalty", low=0.0, high=100.0, low_open=True)
    top_k = _integer(body, "top_k", low=0)
    seed = _integer(body, "seed", low=0, high=2**63 - 1)
    n = _integer(body, "n", low=1)
    # vLLM's extension: decode exactly max_tokens (benchmarks need equal lengths); stop strings still apply.
    ignore_eos = bool(_boolean(body, "ignore_eos"))
    if n is not None and n > limits.max_n:
        raise invalid(f"'n' is {n}, but this server decodes at most {limits.max_n} sequences per request "
                      "(its --max-batch-size); lower 'n'.", "n")
    try:
        return SamplingParams(
            # OpenAI's default is "until the context is full"; so is ours.
            max_new_tokens=room if max_tokens is None else max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=top_k or 0, min_p=min_p or 0.0,
            repetition_penalty=1.0 if penalty is None else penalty,
            n=n or 1, seed=seed, stop_strings=_stop(body), stop_token_ids=[] if ignore_eos else None,
        )
    except ConfigError as e:  # a combination the field checks above let through
        raise invalid(str(e)) from None


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(_boolean(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("'stream_options' is only allowed with 'stream': true.", "stream_options")
        if not isinstance(options, dict):
            raise invalid(f"'stream_options' must be an object; got {_type_name(options)}.", "stream_options")
        extra = sorted(set(options) - {"include_usage"})
        if extra:
            raise invalid(f"This server does not support stream_options {extra}; only 'include_usage'.",
                          "stream_options", "unsupported_field")
        include_usage = bool(_boolean(options, "include_usage"))
    return stream, include_usage


def _model(body: dict[str, Any], limits: ServerLimits) -> str:
    model = body.get("model")
    if model is None:
        raise invalid(f"'model' is required; this server serves '{limits.model_name}'.", "model")
    if not isinstance(model, str):
        raise invalid(f"'model' must be a string; got {_type_name(model)}.", "model")
    if model != limits.model_name:
        raise APIError(404, f"The model '{model[:100]}' does not exist on this server; it serves "
                       f"'{limits.model_name}' (see GET /v1/models).", param="model", code="model_not_found")
    return model


def _message_text(content: Any, index: int) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise invalid(f"messages[{index}].content has a part of type {kind!r}; this text-only model "
                              "takes strings or {\"type\": \"text\", \"text\": ...} parts.", f"messages[{index}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"messages[{index}].content must be a string or an array of text parts; got "
                  f"{_type_name(content)}.", f"messages[{index}].content")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise invalid("'messages' is required: an array of {\"role\", \"content\"} objects.", "messages")
    if not isinstance(messages, list) or not messages:
        raise invalid(f"'messages' must be a non-empty array; got {_type_name(messages)}"
                      f"{' (empty)' if messages == [] else ''}.", "messages")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{index}] must be an object with 'role' and 'content'; got "
                          f"{_type_name(message)}.", f"messages[{index}]")
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise invalid(f"messages[{index}].role is {json.dumps(role)[:50]}; use 'system', 'user' or "
                          "'assistant' (tool messages are not supported).", f"messages[{index}].role")
        extra = sorted(k for k, v in message.items() if k not in ("role", "content", "name") and v is not None)
        if extra:
            raise invalid(f"messages[{index}] has fields this server does not support: {extra}.",
                          f"messages[{index}]", "unsupported_field")
        if "content" not in message or message["content"] is None:
            raise invalid(f"messages[{index}].content is required.", f"messages[{index}].content")
        clean.append({"role": role, "content": _message_text(message["content"], index)})
    return clean


def _prompt(body: dict[str, Any], limits: ServerLimits, encode: Callable[[str], list[int]]) -> list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("'prompt' is required: a string or an array of token ids.", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < limits.vocab_size]
        if bad:
            raise invalid(f"'prompt' has token id {bad[0]}, outside this model's vocabulary [0, "
                          f"{limits.vocab_size}).", "prompt")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise invalid(f"'prompt' holds {len(prompt)} prompts; this server takes one prompt per request (send "
                      "them as concurrent requests: they are batched together).", "prompt")
    else:
        raise invalid(f"'prompt' must be a string or a non-empty array of token ids; got {_type_name(prompt)}.",
                      "prompt")
    if not ids:
        raise invalid("'prompt' encodes to no tokens; send some text.", "prompt")
    return ids


def parse_chat(body: dict[str, Any], limits: ServerLimits, tokenizer: Any) -> ParsedRequest:
    """Validate a /v1/chat/completions body and render its messages with the model's chat template."""
    _check_fields(body, CHAT_FIELDS)
    model = _model(body, limits)
    messages = _messages(body)
    stream, include_usage = _stream_flags(body)
    logprobs = bool(_boolean(body, "logprobs"))
    max_tokens = _integer(body, "max_completion_tokens", low=1)
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = _integer(body, "max_tokens", low=1), "max_tokens"
    try:
        encoding = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except UserError as e:
        raise invalid(f"The chat template could not render these messages: {e}", "messages") from None
    params = _sampling(body, limits, len(encoding.input_ids), max_tokens, name)
    return ParsedRequest("chat", list(encoding.input_ids), params, stream, include_usage, logprobs, model,
                         prompt_text=encoding.text)


def parse_completion(body: dict[str, Any], limits: ServerLimits, tokenizer: Any) -> ParsedRequest:
    """Validate a /v1/completions body; a text prompt gets BOS when the tokenizer asks for it."""
    _check_fields(body, COMPLETION_FIELDS)
    model = _model(body, limits)
    stream, include_usage = _stream_flags(body)
    # The legacy endpoint's logprobs is a count of alternatives per token; only the sampled token's is computed.
    top = _integer(body, "logprobs", low=0)
    if top is not None and top > 1:
        raise invalid(f"'logprobs' is {top}; this server reports the sampled token's log-prob only, so use 0 or 1 "
                      "(top_logprobs comes back null).", "logprobs")
    max_tokens = _integer(body, "max_tokens", low=1)
    ids = _prompt(body, limits, lambda text: tokenizer.encode(text, add_special_tokens=True))
    # The legacy endpoint defaults to 16 new tokens (OpenAI's documented default).
    params = _sampling(body, limits, len(ids), 16 if max_tokens is None else max_tokens, "max_tokens")
    return ParsedRequest("completion", ids, params, stream, include_usage, top is not None, model)


# ---------------------------------------------------------------- responses

def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


@dataclass
class Choice:
    """What one sample has produced so far."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


def token_strings(token_ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[str]:
    return [decode([t]) for t in token_ids]


def chat_logprobs(tokens: Sequence[str], logprobs: Sequence[float]) -> dict[str, Any]:
    # top_logprobs is empty: only the sampled token's log-prob is computed (top_logprobs > 0 is rejected).
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs)]}


def completion_logprobs(tokens: Sequence[str], logprobs: Sequence[float], offset: int) -> dict[str, Any]:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": list(tokens), "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(request: ParsedRequest, response_id: str, created: int, choices: list[Choice],
                  decode: Callable[[list[int]], str]) -> dict[str, Any]:
    """The non-streamed answer: every choice's whole text, finish reason and (if asked) log-probs."""
    out = []
    for choice in choices:
        text = "".join(choice.text)
        item: dict[str, Any] = {"index": choice.index, "finish_reason": choice.finish_reason, "logprobs": None}
        if request.logprobs:
            tokens = token_strings(choice.token_ids, decode)
            item["logprobs"] = (chat_logprobs(tokens, choice.logprobs) if request.kind == "chat"
                                else completion_logprobs(tokens, choice.logprobs, 0))
        if request.kind == "chat":
            item["message"] = {"role": "assistant", "content": text}
        else:
            item["text"] = text
        out.append(item)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return {"id": response_id, "object": "chat.completion" if request.kind == "chat" else "text_completion",
            "created": created, "model": request.model, "choices": out,
            "usage": usage(len(request.prompt_ids), completion_tokens)}


def stream_chunk(request: ParsedRequest, response_id: str, created: int, index: int, *, text: str | None,
                 finish_reason: str | None, logprobs: dict[str, Any] | None = None,
                 role: bool = False) -> dict[str, Any]:
    """One server-sent event's JSON: a choice's new text (chat: a delta; completions: text)."""
    choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason, "logprobs": logprobs}
    if request.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
        kind = "chat.completion.chunk"
    else:
        choice["text"] = text or ""
        kind = "text_completion"
    return {"id": response_id, "object": kind, "created": created, "model": request.model, "choices": [choice]}


def usage_chunk(request: ParsedRequest, response_id: str, created: int, completion_tokens: int) -> dict[str, Any]:
    """The last event with `stream_options.include_usage`: no choices, the whole request's usage."""
    return {"id": response_id, "object": "chat.completion.chunk" if request.kind == "chat" else "text_completion",
            "created": created, "model": request.model, "choices": [],
            "usage": usage(len(request.prompt_ids), completion_tokens)}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
