"""Records -> token ids with loss masks (SFT / pretraining) and prompt / chosen / rejected ids (preferences).

Loss-mask rules (see docs/data.md):
- text (pretraining): every token is a target except the first of a sequence (nothing precedes it);
  EOS is appended (and a target) so the model learns where documents end; BOS is prepended when the tokenizer
  adds one.
- instruction / chat: the chat template's assistant mask: assistant content and its end-of-turn token carry the
  loss; system and user turns, template glue and the assistant header do not. For a single turn this is
  completion-only training; for a multi-turn chat every assistant turn is trained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from alignkit.data.formats import (
    Message,
    PreferencePair,
    chat_to_messages,
    detect_format,
    instruction_to_messages,
    preference_to_pair,
    require_str,
)
from alignkit.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SFT_FORMATS = ("auto", "text", "instruction", "chat", "verifiable")
TRUNCATIONS = ("right", "left", "error", "drop", "split")
PREFERENCE_TRUNCATIONS = ("left", "right", "error", "drop")


class ChatTokenizer(Protocol):
    """What this module needs from `alignkit.tokenizer.Tokenizer`."""

    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

    def apply_chat_template(self, messages: list[Message], *, add_generation_prompt: bool = False) -> Any: ...

    def render_chat(self, messages: list[Message], *, add_generation_prompt: bool = False) -> str: ...


@dataclass
class TokenizedExample:
    """One training sequence. loss_mask[t] is True where input_ids[t] is a target (predicted from tokens < t)."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(self.loss_mask)


@dataclass
class PreferenceExample:
    """Token ids of a prompt and its two responses; each response includes its end-of-turn token."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def _where(index: int, source: str) -> str:
    return f"record {index}" + (f" of {source}" if source else "")


def _left_cut(ids: list[int], keep: int, bos_id: int | None) -> list[int]:
    """The last `keep` tokens of ids; a leading BOS survives the cut (the model was trained with it at 0)."""
    if len(ids) <= keep:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id and keep >= 1:
        return ids[:1] + ids[len(ids) - (keep - 1) :]
    return ids[len(ids) - keep :]


def _response_start(mask: list[bool], message_index: list[int] | None) -> int:
    """Index of the first token of the last assistant turn (its header when the template marks it)."""
    last = max((i for i, m in enumerate(mask) if m), default=0)
    start = last
    while start > 0 and mask[start - 1]:
        start -= 1
    if message_index is not None and message_index[last] >= 0:
        owner = message_index[last]
        while start > 0 and message_index[start - 1] == owner:
            start -= 1
    return start


def _truncate_left(
    ids: list[int], mask: list[bool], *, max_length: int, response_start: int, bos_id: int | None
) -> tuple[list[int], list[bool]]:
    """Cut the start of the prompt so the last response fits; if the response alone does not fit, keep the
    prompt's last max_length // 2 tokens and cut the response's end."""
    prefix = 1 if bos_id is not None and ids and ids[0] == bos_id and response_start > 0 else 0
    budget = max_length - prefix
    prompt_len = response_start - prefix
    response_len = len(ids) - response_start
    if response_len <= budget:
        prompt_keep, response_keep = budget - response_len, response_len
    else:
        prompt_keep = min(prompt_len, budget // 2)
        response_keep = budget - prompt_keep
    keep = list(range(prefix)) + list(range(response_start - prompt_keep, response_start + response_keep))
    return [ids[i] for i in keep], [mask[i] for i in keep]


def tokenize_dataset(
    records: Sequence[dict[str, Any]],
    tokenizer: ChatTokenizer,
    *,
    format: str,
    max_length: int,
    truncation: str | None = None,
    source: str = "",
    text_field: str = "text",
    stats: dict[str, int] | None = None,
    skip_invalid: bool = False,
) -> list[TokenizedExample]:
    """Tokenize SFT / pretraining records into examples of at most max_length tokens.

    format: "text", "instruction", "chat", "verifiable" ({question, answer} as one user / assistant turn) or
        "auto" (detected from the first record's keys).
    truncation: "right" cut the end; "left" cut the start of the prompt and keep the (last) response;
        "error" raise naming the record and its length; "drop" skip it; "split" (text only) cut a long
        document into consecutive max_length chunks. None: "split" for raw text (every pretraining pipeline
        chunks documents; discarding the rest of a document takes an explicit "right"), "right" otherwise.
    stats: an optional dict that receives counts: examples, truncated, dropped_too_long, dropped_no_targets,
        dropped_invalid.
    skip_invalid: skip (and count) the records of a chat / instruction format that fail validation (an empty
        answer, a missing key) instead of stopping at the first with a DataError naming it.
    Examples left without any target token (a prompt that fills max_length under "right") are dropped and counted.
    """
    if format not in SFT_FORMATS:
        raise ConfigError(f"data format {format!r} is not one of {', '.join(SFT_FORMATS)} for SFT / pretraining.")
    if truncation is not None and truncation not in TRUNCATIONS:
        raise ConfigError(f"truncation {truncation!r} is not one of {', '.join(TRUNCATIONS)}.")
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2 tokens, got {max_length}.")
    if not records:
        raise DataError(f"{source or 'the dataset'} has no records to tokenize.")
    if format == "auto":
        format = detect_format(records[0], index=0, source=source)
        if format == "preference":
            raise DataError(
                f"{source or 'the dataset'} holds preference pairs (chosen / rejected); train it with a preference "
                "stage (rm, dpo), or give SFT data with instruction / messages / text keys."
            )
    if truncation is None:
        truncation = "split" if format == "text" else "right"
    if truncation == "split" and format != "text":
        raise ConfigError(f"truncation 'split' only applies to format 'text', not {format!r}; use 'right' or 'left'.")
    counts = {"examples": 0, "truncated": 0, "dropped_too_long": 0, "dropped_no_targets": 0, "dropped_invalid": 0}
    first_invalid = ""
    bos_id = tokenizer.bos_token_id
    examples: list[TokenizedExample] = []
    text_ids: list[list[int]] = []
    if format == "text":
        texts = [require_str(r, text_field, index=i, source=source) for i, r in enumerate(records)]
        encode_batch = getattr(tokenizer, "encode_batch", None)
        if encode_batch is not None:
            text_ids = [list(ids) for ids in encode_batch(texts, add_special_tokens=True)]
        else:
            text_ids = [tokenizer.encode(text, add_special_tokens=True) for text in texts]
    for index, record in enumerate(records):
        message_index: list[int] | None = None
        if format == "text":
            ids = text_ids[index]
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            mask = [False] + [True] * (len(ids) - 1)
        else:
            try:
                messages = _record_messages(record, format, index=index, source=source)
            except DataError as e:
                if not skip_invalid:
                    raise DataError(f"{e} (data.skip_invalid=true skips such records, counted in the log)") from None
                counts["dropped_invalid"] += 1
                first_invalid = first_invalid or str(e)
                continue
            encoding = tokenizer.apply_chat_template(messages)
            ids, mask = list(encoding.input_ids), [bool(m) for m in encoding.assistant_mask]
            message_index = list(encoding.message_index)
        if len(ids) > max_length:
            if truncation == "error":
                raise DataError(
                    f"{_where(index, source)} is {len(ids)} tokens, longer than max_length {max_length}; raise "
                    "max_length, or set truncation to 'right', 'left' or 'drop'."
                )
            if truncation == "drop":
                counts["dropped_too_long"] += 1
                continue
            counts["truncated"] += 1
            if truncation == "split":
                for start in range(0, len(ids), max_length):
                    chunk = ids[start : start + max_length]
                    if len(chunk) >= 2:  # a 1-token chunk has nothing to predict
                        examples.append(TokenizedExample(chunk, [False] + [True] * (len(chunk) - 1)))
                continue
            if truncation == "right":
                ids, mask = ids[:max_length], mask[:max_length]
            elif format == "text":  # left: keep the document's end
                ids = _left_cut(ids, max_length, bos_id)
                mask = [False] + [True] * (len(ids) - 1)
            else:  # left: keep the last response, cut the prompt's start
                response_start = _response_start(mask, message_index)
                ids, mask = _truncate_left(
                    ids, mask, max_length=max_length, response_start=response_start, bos_id=bos_id
                )
        if not any(mask):
            counts["dropped_no_targets"] += 1
            continue
        examples.append(TokenizedExample(ids, mask))
    counts["examples"] = len(examples)
    if counts["dropped_invalid"]:
        logger.warning("%s: skipped %d invalid records (data.skip_invalid); the first: %s", source or "dataset",
                       counts["dropped_invalid"], first_invalid)
    dropped = counts["dropped_too_long"] + counts["dropped_no_targets"]
    if counts["truncated"] or dropped:
        logger.warning(
            "%s: %d of %d records truncated, %d dropped as too long, %d dropped with no target tokens (max_length %d).",
            source or "dataset", counts["truncated"], len(records), counts["dropped_too_long"],
            counts["dropped_no_targets"], max_length,
        )
    if not examples:
        raise DataError(
            f"no usable examples in {source or 'the dataset'} after tokenization ({counts}); raise max_length or "
            "change the truncation policy."
        )
    if stats is not None:
        stats.update(counts)
    return examples


def _record_messages(record: dict[str, Any], format: str, *, index: int, source: str) -> list[Message]:
    if format == "instruction":
        return instruction_to_messages(record, index=index, source=source)
    if format == "chat":
        return chat_to_messages(record, index=index, source=source)
    question = require_str(record, "question", index=index, source=source)
    answer = require_str(record, "answer", index=index, source=source)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# ---------------------------------------------------------------------------------------------------------------
# Preferences


def _encode_many(tokenizer: ChatTokenizer, texts: list[str]) -> list[list[int]]:
    """Encode rendered texts (their special tokens are in the text, so no BOS is added): batched when possible."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if encode_batch is not None:
        return [list(ids) for ids in encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def _response_ids(
    tokenizer: ChatTokenizer, prompt_text: str, prompt_ids: list[int], full_text: str, full_ids: list[int]
) -> tuple[list[int], bool]:
    """Tokens of the conversation after the prompt, and whether the token-prefix check failed.

    The response is tokenized in context (rendering prompt + response) so its ids are exactly what the model
    sees in training and generation. When the prompt's ids are not a prefix of the full conversation's ids
    (a BPE merge across the boundary), the response text after the rendered prompt is tokenized on its own.
    """
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids) :], False
    if not full_text.startswith(prompt_text):
        raise DataError(
            "the chat template renders the prompt with add_generation_prompt=True as text that is not a prefix of "
            f"the rendered conversation ({prompt_text[-80:]!r} vs {full_text[max(0, len(prompt_text) - 80) :][:120]!r}); "
            "preference data needs a template whose generation prompt is the assistant header."
        )
    return tokenizer.encode(full_text[len(prompt_text) :], add_special_tokens=False), True


def tokenize_preferences(
    records: Sequence[dict[str, Any]],
    tokenizer: ChatTokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "left",
    source: str = "",
    strict: bool = False,
) -> tuple[list[PreferenceExample], dict[str, int]]:
    """Tokenize preference pairs: prompt ids (ending with the generation prompt) and each response's ids.

    max_length bounds prompt + the longer response. max_prompt_length (optional) first cuts the prompt from the
    left. Then, when a pair is still too long, truncation decides:
      "left"  cut the prompt from the left (keeping a leading BOS); if the longer response alone leaves less
              than min(prompt, max_length // 2) for the prompt, keep that much prompt and cut the responses' ends;
      "right" keep the prompt and cut the responses' ends (drop the pair when the prompt fills max_length);
      "error" raise naming the record and lengths; "drop" skip the pair.
    Pairs with identical responses carry no preference and are dropped; pairs whose chosen / rejected
    conversations do not share a prompt or do not end with an assistant turn are dropped (DataError when
    strict). Returns (examples, stats) with stats keys: pairs, kept, dropped_identical, dropped_unparsable,
    dropped_too_long, truncated, response_fallback.
    """
    if truncation not in PREFERENCE_TRUNCATIONS:
        raise ConfigError(
            f"truncation {truncation!r} is not one of {', '.join(PREFERENCE_TRUNCATIONS)} for preference data."
        )
    if max_prompt_length is not None and max_prompt_length >= max_length:
        raise ConfigError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length}), "
            "or the responses get no room."
        )
    stats = {
        "pairs": len(records), "kept": 0, "dropped_identical": 0, "dropped_unparsable": 0,
        "dropped_too_long": 0, "truncated": 0, "response_fallback": 0,
    }
    bos_id = tokenizer.bos_token_id
    unparsable: list[str] = []
    pairs: list[tuple[int, PreferencePair]] = []
    for index, record in enumerate(records):
        pair = preference_to_pair(record, index=index, source=source)
        if isinstance(pair, str):
            if strict:
                raise DataError(f"{_where(index, source)} {pair}; fix or remove it, or turn strict off to drop it.")
            stats["dropped_unparsable"] += 1
            unparsable.append(f"{index} ({pair})")
        elif pair.chosen == pair.rejected:
            stats["dropped_identical"] += 1
        else:
            pairs.append((index, pair))
    # Render every prompt and conversation, then tokenize them in one batch (the tokenizer's Rust side does the
    # work); no assistant masks are needed here, only the prompt / response boundary.
    texts: list[str] = []
    for _, pair in pairs:
        texts.append(tokenizer.render_chat(pair.prompt, add_generation_prompt=True))
        texts.append(tokenizer.render_chat(pair.prompt + pair.chosen))
        texts.append(tokenizer.render_chat(pair.prompt + pair.rejected))
    encoded = _encode_many(tokenizer, texts)
    examples: list[PreferenceExample] = []
    for k, (index, _pair) in enumerate(pairs):
        prompt_text, chosen_text, rejected_text = texts[3 * k : 3 * k + 3]
        prompt_ids, chosen_full, rejected_full = encoded[3 * k : 3 * k + 3]
        chosen_ids, fallback_c = _response_ids(tokenizer, prompt_text, prompt_ids, chosen_text, chosen_full)
        rejected_ids, fallback_r = _response_ids(tokenizer, prompt_text, prompt_ids, rejected_text, rejected_full)
        stats["response_fallback"] += int(fallback_c or fallback_r)
        truncated = False
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids = _left_cut(prompt_ids, max_prompt_length, bos_id)
            truncated = True
        longest = max(len(chosen_ids), len(rejected_ids))
        if len(prompt_ids) + longest > max_length:
            if truncation == "error":
                raise DataError(
                    f"{_where(index, source)} is {len(prompt_ids)} prompt + {longest} response tokens, longer than "
                    f"max_length {max_length}; raise max_length, or set truncation to 'left', 'right' or 'drop'."
                )
            if truncation == "drop":
                stats["dropped_too_long"] += 1
                continue
            if truncation == "left":
                min_prompt = min(len(prompt_ids), max_length // 2)
                prompt_ids = _left_cut(prompt_ids, max(max_length - longest, min_prompt), bos_id)
            elif len(prompt_ids) >= max_length:  # "right" keeps the whole prompt: no room for a response
                stats["dropped_too_long"] += 1
                continue
            room = max_length - len(prompt_ids)
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            truncated = True
        stats["truncated"] += int(truncated)
        examples.append(PreferenceExample(prompt_ids, chosen_ids, rejected_ids))
    stats["kept"] = len(examples)
    if unparsable:
        logger.warning(
            "%s: dropped %d preference pairs that do not parse, e.g. records %s.",
            source or "dataset", len(unparsable), ", ".join(unparsable[:5]),
        )
    if stats["truncated"] or stats["dropped_too_long"]:
        logger.warning(
            "%s: %d pairs truncated, %d dropped as too long (max_length %d).",
            source or "dataset", stats["truncated"], stats["dropped_too_long"], max_length,
        )
    if not examples:
        raise DataError(f"no usable preference pairs in {source or 'the dataset'} ({stats}).")
    return examples, stats
