"""Prompts with a checkable answer for the RL trainers and `alignkit sample`: records -> chat-templated ids."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from alignkit.data.formats import verifiable_prompts
from alignkit.errors import DataError
from alignkit.rewards.verifiable import R1_SYSTEM_PROMPT
from alignkit.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class PromptItem:
    """One prompt: its chat messages, their token ids (template + generation prompt), the user's (last) question,
    and the record's other fields (`answer`, ...), which reach the reward functions."""

    messages: list[dict[str, str]]
    prompt_ids: list[int]
    question: str
    fields: dict[str, Any]
    # The record gave a conversation ({messages}) rather than a {question}.
    conversation: bool = False

    @property
    def reward_prompt(self) -> str | list[dict[str, str]]:
        """The prompt the reward functions receive: the question of a {question} record, the whole conversation of
        a {messages} record (so a reward model scores the reply in its context, not after the last turn alone)."""
        return [dict(m) for m in self.messages] if self.conversation else self.question


def reward_prompts(items: list[PromptItem]) -> list[str | list[dict[str, str]]]:
    return [item.reward_prompt for item in items]


def load_prompts(records: list[dict[str, Any]], tokenizer: Tokenizer, *, source: str, max_prompt_length: int,
                 system_prompt: str | None = None, question_field: str = "question", require_answer: bool = True,
                 log: bool = True) -> list[PromptItem]:
    """{question, answer} (or {messages, answer}) records read from `source` -> items. A record without an answer is a DataError naming the file
    and record (unless `require_answer` is False: prompts for a reward model); prompts longer than `max_prompt_length`
    tokens are dropped and counted in the log. `system_prompt` "r1" is DeepSeek-R1-Zero's think / answer prompt."""
    system = R1_SYSTEM_PROMPT if system_prompt == "r1" else system_prompt
    items, too_long = [], 0
    for record, prompt in zip(records, verifiable_prompts(records, system_prompt=system, source=source,
                                                                  question_field=question_field,
                                                                  require_answer=require_answer)):
        ids = list(tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True).input_ids)
        if len(ids) > max_prompt_length:
            too_long += 1
            continue
        conversation = question_field not in record
        fields = {key: value for key, value in record.items() if key not in (question_field, "messages")}
        if prompt.answer is not None:
            fields["answer"] = prompt.answer
        items.append(PromptItem(prompt.messages, ids, prompt.messages[-1]["content"], fields, conversation))
    if log:
        logger.info(f"data: {len(items)} of {len(records)} prompts from {source} ({too_long} longer than "
                    f"max_prompt_length {max_prompt_length} dropped).")
    if not items:
        raise DataError(f"{source}: no prompt fits max_prompt_length {max_prompt_length}; raise it or shorten the "
                        "prompts.")
    return items


def prompt_fields(items: list[PromptItem]) -> dict[str, list[Any]]:
    """Every field any item has, one value per item (None where an item lacks it): the reward functions' kwargs."""
    keys = sorted({key for item in items for key in item.fields})
    return {key: [item.fields.get(key) for item in items] for key in keys}
