"""Batched generation with a KV cache: one prefill, n samples per prompt, finished sequences dropped as they stop.

```python
completions = generate(model, [prompt_ids_0, prompt_ids_1], SamplingParams(temperature=0.7, n=4), tokenizer=tok)
completions[i * n + j]   # sample j of prompt i: token_ids, logprobs (sampling distribution), raw_logprobs, text
```

How a call runs (docs/generation.md has the why):

1. Left-pad the prompts into one [B, P] batch with an attention mask, so every row's next token sits in the last
   column; one prefill over the batch fills a preallocated `KVCache`.
2. With n > 1, the prefilled cache and the last logits are repeated n times (`KVCache.repeat_interleave`):
   the samples of one prompt share its prefill.
3. Decode one token per step for every live row. A row stops on a stop token id (kept in `token_ids`, as in
   Hugging Face `generate`) or a stop string (kept out of `text`); rows that stop are removed from the batch
   (`KVCache.select`), so later steps cost only what the live rows need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from alignkit.errors import ConfigError, UserError
from alignkit.generation.packed import packed_linears
from alignkit.generation.sampling import SamplingParams, presence_mask, sample
from alignkit.model.llama import KVCache

if TYPE_CHECKING:
    from alignkit.model import LlamaForCausalLM
    from alignkit.tokenizer import Tokenizer

__all__ = ["Completion", "SamplingParams", "generate"]


@dataclass
class Completion:
    """One generated sequence. `token_ids`, `logprobs` and `raw_logprobs` have the same length."""

    prompt_index: int
    token_ids: list[int]
    # Log-prob of each token under the distribution it was sampled from (penalty, temperature, top-k/p, min-p
    # applied); 0.0 for greedy decoding, whose choice is deterministic.
    logprobs: list[float]
    # Log-softmax of the raw model logits at each token: the policy's log-prob that RL ratios and KL use.
    raw_logprobs: list[float]
    # "stop": a stop token id (included in token_ids) or a stop string; "length": max_new_tokens or the context.
    finish_reason: str
    # Decoded completion without special tokens, cut before a stop string; None without a tokenizer.
    text: str | None = None


def resolve_stop_token_ids(
    params: SamplingParams, tokenizer: Tokenizer | None, model_config: Any
) -> set[int]:
    """Explicit ids, else the tokenizer's stop ids (EOS and end-of-turn tokens), else the config's eos_token_id."""
    if params.stop_token_ids is not None:
        return set(params.stop_token_ids)
    if tokenizer is not None and tokenizer.stop_token_ids:
        return set(tokenizer.stop_token_ids)
    eos = getattr(model_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def _validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, context: int) -> None:
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise UserError(f"prompt {index} is empty; generation needs at least one prompt token (e.g. BOS).")
        if len(prompt) > context:
            raise UserError(
                f"prompt {index} has {len(prompt)} tokens, more than the model's context window of {context} "
                "(max_position_embeddings); shorten or truncate the prompt."
            )
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= vocab_size:
            raise UserError(
                f"prompt {index} contains token id {low if low < 0 else high}, outside the model's vocabulary "
                f"[0, {vocab_size}); was it encoded with another model's tokenizer?"
            )


class _StopStrings:
    """Finds the first stop string in each row's decoded completion, re-decoding the row after every token.

    Decoding the whole completion (not just the newest token) keeps multi-byte characters and tokenizer
    whitespace rules right; it costs microseconds per row per step, small next to a decode step.
    """

    def __init__(self, stop_strings: list[str], tokenizer: Tokenizer) -> None:
        self.stop_strings = stop_strings
        self.tokenizer = tokenizer

    def cut(self, token_ids: list[int]) -> str | None:
        """The completion text cut before the earliest stop string, or None if none occurs yet."""
        text = self.tokenizer.decode(token_ids)
        hits = [pos for pos in (text.find(s) for s in self.stop_strings) if pos >= 0]
        return text[: min(hits)] if hits else None


def generate(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    tokenizer: Tokenizer | None = None,
    pack_weights: bool = True,
) -> list[Completion]:
    """Generate `params.n` completions for each prompt (token-id lists); result `i * n + j` is sample j of prompt i.

    Runs under `torch.inference_mode()` in eval mode (the model's train/eval mode is restored afterwards). The
    number of new tokens is also bounded by the context window: the longest prompt plus its new tokens must fit
    in `max_position_embeddings`. `pack_weights` lets CPU decoding use pre-packed oneDNN weights (see
    `alignkit.generation.packed`; it holds a second copy of the linear weights while generating).
    """
    config = model.config
    context = config.max_position_embeddings
    if params.stop_strings and tokenizer is None:
        raise ConfigError("SamplingParams.stop_strings needs a tokenizer; pass tokenizer= to generate().")
    _validate_prompts(prompts, config.vocab_size, context)
    if not prompts:
        return []
    n = params.n
    num_rows = len(prompts) * n
    lengths = [len(p) for p in prompts]
    prompt_width = max(lengths)
    # The last sampled token is never fed back, so it needs no position of its own.
    max_new = min(params.max_new_tokens, context - prompt_width + 1)
    stop_ids = resolve_stop_token_ids(params, tokenizer, config)
    stop_strings = _StopStrings(params.stop_strings, tokenizer) if params.stop_strings and tokenizer else None

    token_ids: list[list[int]] = [[] for _ in range(num_rows)]
    logprobs: list[list[float]] = [[] for _ in range(num_rows)]
    raw_logprobs: list[list[float]] = [[] for _ in range(num_rows)]
    finish: list[str] = ["length"] * num_rows
    texts: list[str | None] = [None] * num_rows
    if max_new > 0:
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(), packed_linears(model, batch_size=num_rows, enabled=pack_weights):
                _decode(model, prompts, lengths, params, max_new, stop_ids, stop_strings,
                        token_ids, logprobs, raw_logprobs, finish, texts)
        finally:
            model.train(was_training)

    completions = []
    for row in range(num_rows):
        text = texts[row]
        if text is None and tokenizer is not None:
            text = tokenizer.decode(token_ids[row])
        completions.append(Completion(
            prompt_index=row // n, token_ids=token_ids[row], logprobs=logprobs[row],
            raw_logprobs=raw_logprobs[row], finish_reason=finish[row], text=text,
        ))
    return completions


def _decode(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    lengths: list[int],
    params: SamplingParams,
    max_new: int,
    stop_ids: set[int],
    stop_strings: _StopStrings | None,
    token_ids: list[list[int]],
    logprobs: list[list[float]],
    raw_logprobs: list[list[float]],
    finish: list[str],
    texts: list[str | None],
) -> None:
    """The prefill and the decode loop; fills the per-row output lists in place."""
    device, dtype = model.device, model.dtype
    n = params.n
    batch, width = len(prompts), max(lengths)

    # Left padding: every row's last prompt token is in column width - 1, so one [B, 1] step extends them all.
    # The mask covers the prompt and every future token (future columns are always real tokens).
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    attention_mask = torch.ones(batch, width + max_new, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, : width - len(prompt)] = 0
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    prompt_lengths = torch.tensor(lengths, device=device)

    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
    generator = torch.Generator(device=device).manual_seed(seed)

    cache = KVCache(model.config, batch_size=batch, max_length=width + max_new - 1, dtype=dtype, device=device)
    logits = model(input_ids, attention_mask=attention_mask[:, :width], kv_cache=cache, logits_to_keep=1)[:, -1]
    presence = None
    if params.repetition_penalty != 1.0:
        presence = presence_mask(input_ids, logits.shape[-1], valid=attention_mask[:, :width].bool())
    if n > 1:
        # The n samples of a prompt share its prefill: copy the cache rows, not the computation.
        cache.repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
        prompt_lengths = prompt_lengths.repeat_interleave(n)
        if presence is not None:
            presence = presence.repeat_interleave(n, dim=0)

    live = list(range(batch * n))  # output row of each batch row
    positions = prompt_lengths.clone()  # position of the token each row feeds next
    has_padding = min(lengths) < width
    banned = sorted(stop_ids)
    for step in range(max_new):
        tokens, step_logprobs, step_raw = sample(logits, params, generator, presence=presence,
                                                 banned=banned if step < params.min_new_tokens else None)
        keep: list[int] = []
        for j, (row, token, logprob, raw) in enumerate(
            zip(live, tokens.tolist(), step_logprobs.tolist(), step_raw.tolist())
        ):
            token_ids[row].append(token)
            logprobs[row].append(logprob)
            raw_logprobs[row].append(raw)
            if token in stop_ids:
                finish[row] = "stop"
                continue
            if stop_strings is not None:
                text = stop_strings.cut(token_ids[row])
                if text is not None:
                    finish[row], texts[row] = "stop", text
                    continue
            keep.append(j)
        if not keep or step == max_new - 1:
            return
        if presence is not None:
            presence[torch.arange(len(live), device=device), tokens] = True
        if len(keep) < len(live):
            # Drop finished rows everywhere, so the next steps run on the live rows only.
            index = torch.tensor(keep, device=device)
            cache.select(index)
            tokens, positions = tokens[index], positions[index]
            attention_mask = attention_mask.index_select(0, index)
            if presence is not None:
                presence = presence.index_select(0, index)
            live = [live[j] for j in keep]
            has_padding = bool((positions - step < width).any())
        # Without padding among the live rows, no mask at all: SDPA then runs unmasked.
        step_mask = attention_mask[:, : cache.length + 1] if has_padding else None
        logits = model(tokens[:, None], position_ids=positions[:, None], attention_mask=step_mask,
                       kv_cache=cache, logits_to_keep=1)[:, -1]
        positions += 1
