"""Record formats -> chat messages: instruction (Alpaca), chat, preference (incl. raw HH-RLHF transcripts),
verifiable prompts (GSM8K), plain text; and detection of the format from a record's keys.

A message is `{"role": "system" | "user" | "assistant", "content": str}`. Every error names the record index
and the key, and the source file when the caller passes one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alignkit.errors import DataError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")

# Key sets that identify each format, in detection order (the first whose keys are all present wins).
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "preference": ("chosen", "rejected"),
    "instruction": ("instruction", "output"),
    "verifiable": ("question", "answer"),
    "text": ("text",),
}


def _where(index: int, source: str) -> str:
    return f"record {index}" + (f" of {source}" if source else "")


def detect_format(record: dict[str, Any], *, index: int = 0, source: str = "") -> str:
    """The format whose keys the record has: "chat", "preference", "instruction", "verifiable" or "text"."""
    for name, keys in FORMAT_KEYS.items():
        if all(key in record for key in keys):
            return name
    expected = "; ".join(f"{name}: {{{', '.join(keys)}}}" for name, keys in FORMAT_KEYS.items())
    raise DataError(
        f"cannot tell the format of {_where(index, source)} from its keys {sorted(record)}; "
        f"expected one of these key sets: {expected} (or set the data format explicitly)."
    )


def require_str(record: dict[str, Any], key: str, *, index: int, source: str, allow_empty: bool = False) -> str:
    """record[key] as a string, or a DataError naming the key and the record."""
    if key not in record:
        raise DataError(
            f"{_where(index, source)} has no {key!r} field (it has {sorted(record)}); add it or pick another format."
        )
    value = record[key]
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{_where(index, source)}: {key!r} must be a string, got {type(value).__name__}.")
    if not allow_empty and not value.strip():
        raise DataError(f"{_where(index, source)}: {key!r} is empty; fill it in or remove the record.")
    return value


def instruction_to_messages(record: dict[str, Any], *, index: int = 0, source: str = "") -> list[Message]:
    """Alpaca style: user = instruction (+ "\\n\\n" + input when input is non-empty), assistant = output.

    An optional `system` key becomes a system message.
    """
    instruction = require_str(record, "instruction", index=index, source=source)
    extra = require_str(record, "input", index=index, source=source, allow_empty=True) if "input" in record else ""
    output = require_str(record, "output", index=index, source=source)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages: list[Message] = []
    if record.get("system"):
        messages.append({"role": "system", "content": require_str(record, "system", index=index, source=source)})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def validate_messages(
    messages: Any, *, index: int = 0, source: str = "", key: str = "messages"
) -> list[Message]:
    """Check a list of {role, content} dicts; return clean copies (only role and content)."""
    where = _where(index, source)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{role, content}} objects.")
    clean: list[Message] = []
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: {key}[{turn}] must be an object with 'role' and 'content' keys.")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: {key}[{turn}].role is {role!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{turn}].content must be a string, got {type(content).__name__}.")
        if role == "system" and turn != 0:
            raise DataError(f"{where}: {key}[{turn}] is a system message; only the first message may be one.")
        clean.append({"role": role, "content": content})
    return clean


def chat_to_messages(record: dict[str, Any], *, index: int = 0, source: str = "") -> list[Message]:
    """The record's `messages`, validated; it must contain at least one assistant turn to train on."""
    if "messages" not in record:
        raise DataError(f"{_where(index, source)} has no 'messages' field (it has {sorted(record)}).")
    messages = validate_messages(record["messages"], index=index, source=source)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{_where(index, source)}: 'messages' has no assistant turn, so nothing to train on.")
    return messages


# ---------------------------------------------------------------------------------------------------------------
# Preferences

_HH_MARKER = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh_transcript(text: str) -> list[Message]:
    """An Anthropic HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> messages.

    Consecutive turns of the same speaker are merged into one, joined by a blank line: the files have them where a
    sampled response itself continued with "\\n\\nAssistant:", and treating that as one response is what keeps
    the chosen and rejected transcripts on a shared prefix.
    Text before the first marker (the files have none) becomes a user turn.
    """
    messages: list[Message] = []
    parts = _HH_MARKER.split(text)
    head, rest = parts[0], parts[1:]
    if head.strip():
        messages.append({"role": "user", "content": head.strip()})
    for speaker, content in zip(rest[0::2], rest[1::2]):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += f"\n\n{content}"
        else:
            messages.append({"role": role, "content": content})
    return messages


@dataclass
class PreferencePair:
    """A preference record as messages: the shared prompt and the two responses (assistant turns)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


def _as_messages(value: Any, *, role: str, key: str, index: int, source: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return validate_messages(value, index=index, source=source, key=key)


def preference_to_pair(record: dict[str, Any], *, index: int = 0, source: str = "") -> PreferencePair | str:
    """A preference record -> PreferencePair, or a short reason string when the pair cannot be used.

    Accepted shapes:
    - {prompt, chosen, rejected}, each a string (prompt = one user turn; responses = one assistant turn) or a
      message list (TRL's conversational format);
    - {chosen, rejected} full conversations without a prompt: message lists, or raw HH-RLHF transcript strings.
      The shared leading messages are the prompt, and what follows is each response.
    """
    where = _where(index, source)
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(f"{where} has no {key!r} field (it has {sorted(record)}); preferences need both.")
        if not isinstance(record[key], (str, list)):
            raise DataError(f"{where}: {key!r} must be a string or a list of messages.")
    if "prompt" in record:
        prompt = _as_messages(record["prompt"], role="user", key="prompt", index=index, source=source)
        chosen = _as_messages(record["chosen"], role="assistant", key="chosen", index=index, source=source)
        rejected = _as_messages(record["rejected"], role="assistant", key="rejected", index=index, source=source)
        return PreferencePair(prompt, chosen, rejected)
    if isinstance(record["chosen"], str) and isinstance(record["rejected"], str):
        chosen_all, rejected_all = parse_hh_transcript(record["chosen"]), parse_hh_transcript(record["rejected"])
    else:
        chosen_all = _as_messages(record["chosen"], role="assistant", key="chosen", index=index, source=source)
        rejected_all = _as_messages(record["rejected"], role="assistant", key="rejected", index=index, source=source)
    for messages in (chosen_all, rejected_all):
        if not messages or messages[-1]["role"] != "assistant":
            return "does not end with an assistant turn"
    # The prompt is everything before the final assistant turn, and must be the same on both sides.
    prompt = chosen_all[:-1]
    if rejected_all[:-1] != prompt:
        return "chosen and rejected do not share the prompt"
    if not prompt:
        return "has no prompt before the response"
    return PreferencePair(prompt, chosen_all[-1:], rejected_all[-1:])


# ---------------------------------------------------------------------------------------------------------------
# Verifiable prompts (RL with verifiable rewards)

_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def extract_gsm8k_answer(text: str) -> str | None:
    """The final answer after GSM8K's "####" marker, normalised: "#### 1,000" -> "1000", "#### -3.5" -> "-3.5".

    Thousands separators, a leading "$" and a trailing "." are dropped. None when the marker is absent or nothing
    follows it.
    """
    match = _GSM8K_ANSWER.search(text)
    if match is None or not match.group(1).strip():
        return None
    answer = match.group(1).strip().splitlines()[0].strip()
    answer = answer.replace(",", "").replace("$", "").strip()
    if answer.endswith(".") and _is_number(answer[:-1]):
        answer = answer[:-1]
    return answer


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class VerifiablePrompt:
    """A prompt for RL with a checkable answer: `messages` to generate from, `answer` the reference."""

    messages: list[Message]
    answer: str | None  # None only when the answer was optional and the record has none


def verifiable_prompts(
    records: Sequence[dict[str, Any]],
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    system_prompt: str | None = None,
    source: str = "",
    require_answer: bool = True,
) -> list[VerifiablePrompt]:
    """{question, answer} records -> prompts with a reference answer.

    A record may give a conversation instead of a question: `messages` ({role, content} turns ending with a user
    turn; a final assistant turn, a reference reply, is dropped). `system_prompt` goes first unless the record has
    its own system message. A GSM8K-style answer ("...\\n#### 72") gives "72"; any other answer is used as given
    (stripped; numbers are converted to strings). `require_answer=False` lets records without one through (answer
    None: prompts scored by a reward model).
    """
    prompts = []
    for index, record in enumerate(records):
        messages: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt else []
        if question_field not in record and "messages" in record:
            turns = validate_messages(record["messages"], index=index, source=source)
            if turns[-1]["role"] == "assistant":
                turns = turns[:-1]
            if not turns or turns[-1]["role"] != "user":
                raise DataError(f"{_where(index, source)}: 'messages' must end with a user turn (optionally followed "
                                "by one assistant reply, which is dropped) to be a prompt.")
            messages = turns if turns[0]["role"] == "system" else messages + turns
        else:
            question = require_str(record, question_field, index=index, source=source)
            messages.append({"role": "user", "content": question})
        if answer_field not in record or record[answer_field] is None:
            if not require_answer:
                prompts.append(VerifiablePrompt(messages=messages, answer=None))
                continue
            raise DataError(f"{_where(index, source)} has no {answer_field!r} field (it has {sorted(record)}).")
        raw = record[answer_field]
        if isinstance(raw, str):
            answer = extract_gsm8k_answer(raw) if "####" in raw else raw.strip()
        else:
            answer = str(raw)
        if not answer:
            raise DataError(f"{_where(index, source)}: {answer_field!r} gives an empty reference answer.")
        prompts.append(VerifiablePrompt(messages=messages, answer=answer))
    return prompts
