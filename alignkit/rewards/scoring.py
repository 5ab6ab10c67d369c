"""Reward-model scoring: load a reward model, turn (prompt, response) into the reward it assigns.

A reward model is `LlamaForScore`: the Llama decoder with a scalar head `score` (`score.weight` [1, hidden], no
bias) read at the last token of the conversation. It is stored as HF's `LlamaForSequenceClassification` with
`num_labels: 1`, so `transformers.AutoModelForSequenceClassification` loads the same directory and, for an
unpadded input, returns the same number (`logits[0, 0]`).

A conversation is scored exactly as the reward model saw it in training: the chat template renders the prompt
messages plus the assistant response, and the reward is the head's value at the final token (the template's
end-of-turn glue, e.g. `<|im_end|>\\n`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from alignkit.errors import CheckpointError, DataError
from alignkit.model import LlamaForCausalLM
from alignkit.model.llama import LlamaForScore
from alignkit.tokenizer import Tokenizer

Message = dict[str, str]


def score_model_from_causal_lm(lm: LlamaForCausalLM, *, head_init: str = "zero") -> LlamaForScore:
    """A reward model sharing `lm`'s decoder (no copy), with a fresh score head; the LM head is dropped.

    `head_init`: "zero" (every response starts at reward 0, so the first Bradley-Terry loss is exactly ln 2 and the
    head only learns what separates chosen from rejected), or "normal": N(0, 1/sqrt(hidden + 1)) as in TRL, from
    the global torch RNG (seeded by the trainer). The random head gives each response an arbitrary initial reward
    of order |h| / sqrt(hidden) (about 2 for SmolLM2's final hidden states) that a small dataset must first
    unlearn: head-only training on 400 HH-RLHF pairs reached ~0.60 held-out accuracy from zero and ~0.55 from
    the random init (mean of 8 splits).
    """
    if head_init not in ("zero", "normal"):
        raise ValueError(f"head_init must be 'zero' or 'normal'; got {head_init!r}.")
    with torch.device("meta"):
        model = LlamaForScore(lm.config)
    model.model = lm.model
    weight = lm.model.embed_tokens.weight
    model.score = nn.Linear(lm.config.hidden_size, 1, bias=False, device=weight.device, dtype=weight.dtype)
    if head_init == "zero":
        nn.init.zeros_(model.score.weight)
    else:
        nn.init.normal_(model.score.weight, std=1 / math.sqrt(lm.config.hidden_size + 1))
    model.train(lm.training)
    return model


def load_reward_model(
    path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[LlamaForScore, Tokenizer]:
    """A trained reward model (an HF directory with a score head, or an alignkit rm run) and its tokenizer.

    A checkpoint without a score head (a language model, a .gguf) is a CheckpointError naming the path.
    """
    from alignkit.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(path, dtype=dtype, device=device, kind="score")
    assert isinstance(model, LlamaForScore)
    if tokenizer is None:
        raise CheckpointError(
            f"{path}: the reward model has no tokenizer.json next to its weights; save the tokenizer there (an "
            "alignkit rm run's final/ has one)."
        )
    return model, tokenizer


def last_token_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The reward of each row: the head's value at its last real token, in fp32 [B]; right or left padding.

    Right padding (every row's real tokens first) only follows the real tokens, so plain causal attention is exact
    for them and the fused causal kernel stays available (no explicit mask). Any other padding (left-padded rows,
    as generation produces them) is masked out and the positions count from each row's first real token.
    """
    real = attention_mask.bool()
    if bool((real.long().cummin(-1).values.bool() == real).all()):  # right padding
        values = model(input_ids, position_ids=position_ids)  # [B, T]
        last = real.long().sum(-1) - 1
    else:
        values = model(input_ids, position_ids=position_ids, attention_mask=attention_mask)
        last = real.shape[1] - 1 - real.flip(-1).long().argmax(-1)  # index of each row's last real token
    return values.gather(1, last[:, None]).squeeze(1).float()


def conversation_ids(tokenizer: Tokenizer, prompt: str | list[Message], response: str | None = None, *,
                     max_length: int | None = None) -> list[int]:
    """Token ids of `prompt` (a user message or a message list) plus the assistant `response`, as training renders
    them; longer than `max_length` -> the start is cut (the end, where the reward is read, is kept)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    ids = tokenizer.encode(tokenizer.render_chat(messages), add_special_tokens=False)
    if max_length is not None and len(ids) > max_length:
        bos = tokenizer.bos_token_id
        ids = ids[:1] + ids[len(ids) - max_length + 1 :] if bos is not None and ids[0] == bos else ids[-max_length:]
    return ids


@torch.no_grad()
def score_ids(model: nn.Module, sequences: Sequence[Sequence[int]], *, pad_id: int, batch_size: int = 8
              ) -> list[float]:
    """Rewards of token-id sequences, batched longest first (less padding) and returned in input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    scores = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, : len(sequences[i])] = torch.tensor(list(sequences[i]), dtype=torch.long)
            mask[row, : len(sequences[i])] = 1
        rewards = last_token_rewards(model, input_ids.to(device), mask.to(device))
        for row, i in enumerate(chunk):
            scores[i] = float(rewards[row])
    return scores


def record_conversation(record: dict[str, Any], *, index: int, source: str) -> tuple[str | list[Message], str | None]:
    """(prompt, response) of a scoring record: {prompt, response} (prompt a string or messages) or {messages}."""
    where = f"record {index} of {source}"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} messages.")
        return messages, None
    for key in ("prompt", "response"):
        if key not in record:
            raise DataError(
                f"{where} has no {key!r} field (it has {sorted(record)}); scoring records are {{prompt, response}} "
                "or {messages}."
            )
    if not isinstance(record["response"], str):
        raise DataError(f"{where}: 'response' must be a string.")
    return record["prompt"], record["response"]


def score_conversations(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[tuple[Any, str | None]], *,
                        max_length: int | None = None, batch_size: int = 8) -> list[float]:
    """Rewards of (prompt, response) pairs (response None: the prompt is a whole conversation)."""
    sequences = [conversation_ids(tokenizer, p, r, max_length=max_length) for p, r in conversations]
    return score_ids(model, sequences, pad_id=tokenizer.pad_token_id, batch_size=batch_size)


def reward_model_function(path: str | os.PathLike[str], *, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32, batch_size: int = 8, max_length: int | None = None
                          ) -> Callable[..., list[float | None]]:
    """A reward model as a reward function `(prompts, completions, **fields) -> rewards` (`rm:PATH` in a reward
    spec), loaded once.

    It works on text: each (prompt, completion) is rendered with the reward model's own tokenizer and chat template,
    so a policy with another tokenizer is scored correctly (the completion's text is re-tokenised). A prompt is the
    user's message or a message list.
    """
    model, tokenizer = load_reward_model(path, dtype=dtype, device=device)
    model.requires_grad_(False)

    def reward_model(prompts: Sequence[Any], completions: Sequence[str], **_: Any) -> list[float | None]:
        return list(score_conversations(model, tokenizer, list(zip(prompts, completions)), max_length=max_length,
                                        batch_size=batch_size))

    return reward_model
