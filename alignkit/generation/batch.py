"""The running batch: the one decoding loop. `generate()` and the `Scheduler` both drive it.

```python
batch = RunningBatch(model)
batch.open(batch_size_hint=8)        # eval mode + packed CPU weights until close()
batch.admit([request])               # prefill the new prompts, merge their rows into the running cache
while batch.rows:
    sampled = batch.step()           # one token for every row; finished rows leave; the next forward runs
batch.close()
```

Layout of the cache (docs/generation.md has the why). Every live row's newest token sits in the cache's last
column, so one `[B, 1]` forward extends every row. Rows are left-padded to line up; `starts[i]` is the column of
row i's first real token, and the attention mask hides the columns before it. Position ids count real tokens
only, so a row computes what it would alone wherever its columns are.

- **Joining.** New requests are prefilled together (left-padded among themselves), their n samples copied from
  the prefilled rows, then merged: old and new rows are right-aligned in a new cache as wide as the longer of
  the two (a longer prompt re-pads the running rows). With no running rows (all of `generate()`) the prefill
  cache is the batch's cache, as wide as it will ever need to be: no copy.
- **Leaving.** Finished and cancelled rows are removed from every per-row tensor (`KVCache.select`); leading
  columns that are padding for every remaining row are then dropped (a view, no copy), so the cache stays as
  wide as the longest live row and never outgrows the context window.
- **Sampling.** Rows of one request are contiguous and share its `SamplingParams` and `torch.Generator`; each
  request samples its own rows, so its draws do not depend on what else is in the batch. One request (all of
  `generate()`) is one `sample` call over the whole batch, as before there was a scheduler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from alignkit.errors import ConfigError, UserError
from alignkit.generation.packed import packed_linears
from alignkit.generation.sampling import SamplingParams, presence_mask, sample
from alignkit.model.llama import KVCache

if TYPE_CHECKING:
    from alignkit.model import LlamaForCausalLM
    from alignkit.tokenizer import Tokenizer


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


def check_prompt(prompt: Sequence[int], vocab_size: int, context: int, name: str) -> None:
    """A `UserError` naming the prompt (`name`, e.g. "prompt 3") when it is empty, too long or out of vocabulary."""
    if len(prompt) == 0:
        raise UserError(f"{name} is empty; generation needs at least one prompt token (e.g. BOS).")
    if len(prompt) > context:
        raise UserError(
            f"{name} has {len(prompt)} tokens, more than the model's context window of {context} "
            "(max_position_embeddings); shorten or truncate the prompt."
        )
    low, high = min(prompt), max(prompt)
    if low < 0 or high >= vocab_size:
        raise UserError(
            f"{name} contains token id {low if low < 0 else high}, outside the model's vocabulary "
            f"[0, {vocab_size}); was it encoded with another model's tokenizer?"
        )


class StopStrings:
    """Finds the first stop string in a row's decoded completion, re-decoding the row after every token.

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


class Row:
    """One sequence being generated: sample `sample_index` of prompt `prompt_index` of its request."""

    __slots__ = ("request", "prompt_index", "sample_index", "token_ids", "logprobs", "raw_logprobs",
                 "finish_reason", "text", "emitted")

    def __init__(self, request: Request, prompt_index: int, sample_index: int) -> None:
        self.request = request
        self.prompt_index = prompt_index
        self.sample_index = sample_index
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []  # under the sampling distribution
        self.raw_logprobs: list[float] = []  # log-softmax of the raw logits
        self.finish_reason: str | None = None  # "stop" or "length" once finished
        self.text: str | None = None  # the text cut before a stop string, when one ended the row
        self.emitted = 0  # characters of text already streamed (the Scheduler's events)


class Request:
    """Prompts that share one `SamplingParams` and one sampling generator; each prompt gets `params.n` rows.

    `generate()` makes one request of all its prompts (one generator for the batch, as its seed promises); the
    Scheduler makes one request per `add`. `params.max_new_tokens` is already clipped to the context window.
    """

    def __init__(
        self, request_id: int, prompts: list[list[int]], params: SamplingParams, *, stop_ids: set[int],
        stop_strings: StopStrings | None, device: torch.device,
    ) -> None:
        self.id = request_id
        self.prompts = prompts
        self.params = params
        self.stop_ids = stop_ids
        self.banned = sorted(stop_ids)  # masked out of sampling until min_new_tokens
        self.stop_strings = stop_strings
        # None draws the seed from torch's global RNG, so torch.manual_seed makes an unseeded call reproducible.
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.rows = [Row(self, i, j) for i in range(len(prompts)) for j in range(params.n)]
        self.num_generated = 0  # tokens each live row has sampled (rows of a request advance together)
        # Bool [live rows of this request, V]: tokens seen so far, for the repetition penalty (None without one).
        self.presence: torch.Tensor | None = None


def make_request(
    request_id: int, prompts: list[list[int]], params: SamplingParams, *, model: LlamaForCausalLM,
    tokenizer: Tokenizer | None,
) -> Request:
    """A request with `max_new_tokens` clipped so the longest prompt plus its new tokens fit the context window.

    The last sampled token is never fed back, so it needs no position of its own: a prompt of P tokens leaves
    room for context - P + 1 new ones. Prompts must be checked (`check_prompt`) and max_new_tokens > 0.
    """
    config = model.config
    if params.stop_strings and tokenizer is None:
        raise ConfigError("SamplingParams.stop_strings needs a tokenizer to match text; pass one with the model.")
    max_new = min(params.max_new_tokens, config.max_position_embeddings - max(len(p) for p in prompts) + 1)
    if max_new != params.max_new_tokens:
        params = replace(params, max_new_tokens=max_new, min_new_tokens=min(params.min_new_tokens, max_new))
    stop_strings = StopStrings(params.stop_strings, tokenizer) if params.stop_strings and tokenizer else None
    return Request(request_id, prompts, params, stop_ids=resolve_stop_token_ids(params, tokenizer, config),
                   stop_strings=stop_strings, device=model.device)


class RunningBatch:
    """Live rows in one KV cache, with the next-token logits of every row ready to sample."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.rows: list[Row] = []
        # (request, first row, end row): each request's rows are contiguous, in admission order.
        self.segments: list[tuple[Request, int, int]] = []
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None  # [B, V] next-token logits of every row
        self.positions: torch.Tensor | None = None  # [B] position of the token each row feeds next
        self.mask: torch.Tensor | None = None  # bool [B, cache capacity]: False on left padding
        self.starts: list[int] = []  # column of each row's first real token
        self.has_padding = False
        self._session: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------ session

    def open(self, *, batch_size_hint: int, pack_weights: bool = True) -> None:
        """Eval mode and (on CPU) packed linear weights until `close()`; the train mode is restored there."""
        if self._session is not None:
            return
        session = contextlib.ExitStack()
        session.callback(self.model.train, self.model.training)
        self.model.eval()
        try:
            session.enter_context(packed_linears(self.model, batch_size=batch_size_hint, enabled=pack_weights))
        except BaseException:
            session.close()
            raise
        self._session = session

    def close(self) -> None:
        """Drop every row and leave the session (unpack the weights, restore the model's mode)."""
        self.rows, self.segments, self.starts = [], [], []
        self.cache = self.logits = self.positions = self.mask = None
        if self._session is not None:
            session, self._session = self._session, None
            session.close()

    # ------------------------------------------------------------------ joining

    def admit(self, requests: list[Request]) -> None:
        """Prefill the requests' prompts in one forward and add their rows after the running ones."""
        model, config = self.model, self.model.config
        device, dtype = model.device, model.dtype
        prompts = [p for r in requests for p in r.prompts]
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        repeats = [r.params.n for r in requests for _ in r.prompts]
        new_rows = [row for r in requests for row in r.rows]
        # Columns each row still feeds after this step's sample: a row that may sample m tokens feeds m - 1.
        remaining = max(r.params.max_new_tokens - 1 for r in requests)
        if self.rows:
            remaining = max(remaining, max(r.params.max_new_tokens - r.num_generated - 1 for r, _, _ in self.segments))

        # Left padding: every new row's last prompt token is in column width - 1.
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        starts = torch.tensor([width - n for n in lengths])
        prefill_mask = torch.arange(width)[None, :] >= starts[:, None]
        input_ids, prefill_mask = input_ids.to(device), prefill_mask.to(device)
        # Alone, the prefill cache is the batch's cache, sized for every step to come; joining a running batch,
        # it only holds the prompts until the merge copies them.
        capacity = width + remaining if not self.rows else width
        cache = KVCache(config, batch_size=len(prompts), max_length=capacity, dtype=dtype, device=device)
        logits = model(input_ids, attention_mask=prefill_mask, kv_cache=cache, logits_to_keep=1)[:, -1]

        first = 0
        for request in requests:
            end = first + len(request.prompts)
            if request.params.repetition_penalty != 1.0:
                seen = presence_mask(input_ids[first:end], logits.shape[-1], valid=prefill_mask[first:end])
                request.presence = seen.repeat_interleave(request.params.n, dim=0)
            first = end
        # The n samples of a prompt share its prefill: copy the cache rows, not the computation.
        if len(set(repeats)) == 1 and repeats[0] > 1:
            cache.repeat_interleave(repeats[0])
            logits = logits.repeat_interleave(repeats[0], dim=0)
        elif max(repeats) > 1:
            index = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(repeats)).to(device)
            cache.select(index)
            logits = logits.index_select(0, index)
        row_starts = [width - n for n, k in zip(lengths, repeats) for _ in range(k)]
        positions = torch.tensor([n for n, k in zip(lengths, repeats) for _ in range(k)], device=device)

        if not self.rows:
            self.cache, self.logits, self.positions, self.starts = cache, logits, positions, row_starts
        else:
            self._merge(cache, logits, positions, row_starts, remaining)
        self.rows = self.rows + new_rows
        self._rebuild_mask()
        self._index_segments()

    def _merge(self, new: KVCache, logits: torch.Tensor, positions: torch.Tensor, starts: list[int],
               remaining: int) -> None:
        """Right-align the running rows and the new rows in one new cache as wide as the wider of the two."""
        assert self.cache is not None and self.logits is not None and self.positions is not None
        old = self.cache
        old_rows, old_length, new_length = old.batch_size, old.length, new.length
        length = max(old_length, new_length)
        merged = KVCache(self.model.config, batch_size=old_rows + new.batch_size, max_length=length + remaining,
                         dtype=self.model.dtype, device=self.model.device)
        for store, old_store, new_store in ((merged.keys, old.keys, new.keys),
                                            (merged.values, old.values, new.values)):
            for into, a, b in zip(store, old_store, new_store):
                into[:old_rows, :, length - old_length : length] = a[:, :, :old_length]
                into[old_rows:, :, length - new_length : length] = b[:, :, :new_length]
        merged.length = length
        self.cache = merged
        self.logits = torch.cat([self.logits, logits])
        self.positions = torch.cat([self.positions, positions])
        self.starts = [s + length - old_length for s in self.starts] + [s + length - new_length for s in starts]

    def _rebuild_mask(self) -> None:
        assert self.cache is not None
        device = self.model.device
        starts = torch.tensor(self.starts, device=device)
        self.mask = torch.arange(self.cache.max_length, device=device)[None, :] >= starts[:, None]
        self.has_padding = max(self.starts) > 0

    def _index_segments(self) -> None:
        segments: list[tuple[Request, int, int]] = []
        for j, row in enumerate(self.rows):
            if segments and segments[-1][0] is row.request:
                segments[-1] = (row.request, segments[-1][1], j + 1)
            else:
                segments.append((row.request, j, j + 1))
        self.segments = segments

    # ------------------------------------------------------------------ leaving

    def drop(self, request_ids: set[int]) -> None:
        """Remove every row of these requests (cancelled) before the next sample."""
        keep = [j for j, row in enumerate(self.rows) if row.request.id not in request_ids]
        if len(keep) < len(self.rows):
            self._keep(keep, None)

    def _keep(self, keep: list[int], tokens: torch.Tensor | None) -> torch.Tensor | None:
        """Keep only the rows `keep` in every per-row tensor (and `tokens`, returned); trim shared padding."""
        if not keep:
            self.rows, self.segments, self.starts = [], [], []
            self.cache = self.logits = self.positions = self.mask = None
            return None
        assert self.cache is not None and self.positions is not None and self.mask is not None
        index = torch.tensor(keep, device=self.model.device)
        self.cache.select(index)
        self.positions = self.positions.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        if self.logits is not None:
            self.logits = self.logits.index_select(0, index)
        if tokens is not None:
            tokens = tokens.index_select(0, index)
        for request, first, end in self.segments:
            if request.presence is not None:
                local = [j - first for j in keep if first <= j < end]
                request.presence = request.presence[local] if local else None
        self.rows = [self.rows[j] for j in keep]
        self.starts = [self.starts[j] for j in keep]
        # Columns that are padding for every remaining row hold nothing anyone reads: drop them (views, no copy),
        # so the cache is as wide as its longest live row, which the context window bounds.
        offset = min(self.starts)
        if offset:
            cache = self.cache
            cache.keys = [k[:, :, offset:] for k in cache.keys]
            cache.values = [v[:, :, offset:] for v in cache.values]
            cache.length -= offset
            cache.max_length -= offset
            self.mask = self.mask[:, offset:]
            self.starts = [s - offset for s in self.starts]
        self.has_padding = max(self.starts) > 0
        self._index_segments()
        return tokens

    # ------------------------------------------------------------------ decoding

    def step(self) -> list[Row]:
        """Sample one token for every row, retire the rows that finished, and run the forward that gives the next
        logits of the rest. Returns every row that sampled, in batch order (finished ones have finish_reason)."""
        assert self.logits is not None and self.positions is not None and self.cache is not None
        rows, segments = self.rows, self.segments
        if len(segments) == 1:
            tokens, step_logprobs, step_raw = self._sample(segments[0][0], self.logits)
        else:
            parts = [self._sample(request, self.logits[first:end]) for request, first, end in segments]
            tokens, step_logprobs, step_raw = (torch.cat([p[i] for p in parts]) for i in range(3))
        self.logits = None
        keep: list[int] = []
        for j, (row, token, logprob, raw) in enumerate(
            zip(rows, tokens.tolist(), step_logprobs.tolist(), step_raw.tolist())
        ):
            row.token_ids.append(token)
            row.logprobs.append(logprob)
            row.raw_logprobs.append(raw)
            request = row.request
            if token in request.stop_ids:
                row.finish_reason = "stop"
                continue
            if request.stop_strings is not None:
                text = request.stop_strings.cut(row.token_ids)
                if text is not None:
                    row.finish_reason, row.text = "stop", text
                    continue
            if len(row.token_ids) == request.params.max_new_tokens:
                row.finish_reason = "length"
                continue
            keep.append(j)
        for request, first, end in segments:
            request.num_generated += 1
            if keep and request.presence is not None:
                request.presence[torch.arange(end - first, device=tokens.device), tokens[first:end]] = True
        if len(keep) < len(rows):
            # Drop finished rows everywhere, so the next steps run on the live rows only.
            kept = self._keep(keep, tokens)
            if kept is None:
                return rows
            tokens = kept
        cache, positions = self.cache, self.positions
        assert cache is not None and positions is not None and self.mask is not None
        # Without padding among the live rows, no mask at all: SDPA then runs unmasked.
        step_mask = self.mask[:, : cache.length + 1] if self.has_padding else None
        self.logits = self.model(tokens[:, None], position_ids=positions[:, None], attention_mask=step_mask,
                                 kv_cache=cache, logits_to_keep=1)[:, -1]
        positions += 1
        return rows

    def _sample(self, request: Request, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        banned = request.banned if request.num_generated < request.params.min_new_tokens else None
        return sample(logits, request.params, request.generator, presence=request.presence, banned=banned)
