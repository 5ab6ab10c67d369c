"""Continuous batching: requests join the running batch between decode steps and leave as they finish.

```python
sched = Scheduler(model, tokenizer, max_batch_size=8)
request_id = sched.add(prompt_ids, SamplingParams(temperature=0.7, seed=1))
while sched.has_work():
    for event in sched.step():       # one TokenEvent per sampled token of every live sample
        print(event.text, end="")
```

Each `step()` first admits waiting requests in FIFO order while their rows fit in `max_batch_size` (all n samples
of a request join together; several arriving requests are prefilled in one forward), then samples one token for
every row and runs one decode forward. The decoding itself is `alignkit.generation.batch.RunningBatch`, the same
loop `generate()` runs. Every request has its own `torch.Generator`, so a seeded request draws the same tokens
whatever else shares the batch.

`step()` must be called from one thread; `add`, `cancel` and `has_work` may be called from any thread.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from alignkit.errors import ConfigError, UserError
from alignkit.generation.batch import Request, Row, RunningBatch, check_prompt, make_request
from alignkit.generation.sampling import SamplingParams

if TYPE_CHECKING:
    from alignkit.model import LlamaForCausalLM
    from alignkit.tokenizer import Tokenizer

__all__ = ["Scheduler", "TokenEvent"]


@dataclass
class TokenEvent:
    """One sampled token of one sample of a request."""

    request_id: int
    sample_index: int  # 0 .. n - 1
    token_id: int
    logprob: float  # under the sampling distribution (as Completion.logprobs)
    raw_logprob: float  # log-softmax of the raw logits (as Completion.raw_logprobs)
    # New printable text since this sample's previous event: "" while an incomplete multi-byte character or a
    # possible start of a stop string is held back. Over all events it adds up to the final Completion.text.
    # None without a tokenizer.
    text: str | None
    finish_reason: str | None  # None while running; "stop" or "length" on the sample's last event


class Scheduler:
    """A running batch that requests join (`add`) and leave (finished or `cancel`ed) between decode steps."""

    def __init__(
        self, model: LlamaForCausalLM, tokenizer: Tokenizer | None, *, max_batch_size: int = 8,
        pack_weights: bool = True, release_when_idle: bool = True,
    ) -> None:
        """`pack_weights`: decode on CPU with pre-packed oneDNN weights (`alignkit.generation.packed`), a copy of
        the linear weights held while the scheduler is busy. `release_when_idle`: unpack them and restore the
        model's train/eval mode whenever no request is waiting or running, so a model trained between uses is never
        decoded with stale packed weights; False keeps them until `close()` (a server or chat that owns the model
        then does not pay the packing again for every request after an idle moment)."""
        if max_batch_size < 1:
            raise ConfigError(f"Scheduler max_batch_size = {max_batch_size} must be >= 1.")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.pack_weights = pack_weights
        self.release_when_idle = release_when_idle
        self._batch = RunningBatch(model)
        # Restore the model even when the scheduler is dropped without close() (the callback holds the batch only).
        weakref.finalize(self, self._batch.close)
        self._lock = threading.Lock()  # guards _waiting, _cancelled and _next_id (add/cancel from other threads)
        self._waiting: deque[Request] = deque()
        self._cancelled: set[int] = set()
        self._next_id = 0

    def add(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Queue a prompt (token ids) and return its request id. Its new tokens are clipped to the context window
        as in `generate()`; a bad prompt or params raise `UserError` here, not in `step()`."""
        config = self.model.config
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
            raise UserError("the prompt must be a list of token ids (ints); encode text with the tokenizer first.")
        check_prompt(prompt_ids, config.vocab_size, config.max_position_embeddings, "the prompt")
        if params.max_new_tokens < 1:
            raise UserError("SamplingParams.max_new_tokens must be >= 1 for a scheduled request (it streams tokens).")
        if params.n > self.max_batch_size:
            raise UserError(f"SamplingParams.n = {params.n} samples cannot run together in a batch of at most "
                            f"{self.max_batch_size} rows; lower n or raise max_batch_size.")
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
            request = make_request(request_id, [list(prompt_ids)], params, model=self.model,
                                   tokenizer=self.tokenizer)
            self._waiting.append(request)
        return request_id

    def cancel(self, request_id: int) -> None:
        """Stop a request: a waiting one never starts, a running one's rows leave at the next step. No more events
        for it come from any `step()` that returns after this call. Unknown or finished ids are ignored."""
        with self._lock:
            for request in self._waiting:
                if request.id == request_id:
                    self._waiting.remove(request)
                    return
            self._cancelled.add(request_id)

    def has_work(self) -> bool:
        """Any request waiting or running."""
        with self._lock:
            return bool(self._waiting) or bool(self._batch.rows)

    def step(self) -> list[TokenEvent]:
        """Admit waiting requests that fit, then sample one token for every live row (one decode step)."""
        batch = self._batch
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            admitted: list[Request] = []
            free = self.max_batch_size - sum(row.request.id not in cancelled for row in batch.rows)
            while self._waiting and len(self._waiting[0].rows) <= free:
                request = self._waiting.popleft()
                admitted.append(request)
                free -= len(request.rows)
        try:
            with torch.inference_mode():
                if cancelled and batch.rows:
                    batch.drop(cancelled)
                if admitted:
                    batch.open(batch_size_hint=self.max_batch_size, pack_weights=self.pack_weights)
                    batch.admit(admitted)
                sampled = batch.step() if batch.rows else []
        except BaseException:
            batch.close()  # the batch's tensors may be half-updated: its requests are lost, the model restored
            raise
        events = [self._event(row) for row in sampled]
        with self._lock:
            if self._cancelled:  # cancelled while this step ran
                events = [e for e in events if e.request_id not in self._cancelled]
            if self.release_when_idle and not batch.rows and not self._waiting:
                batch.close()  # idle: unpack the weights and restore the model's mode until the next request
        return events

    def close(self) -> None:
        """Drop every waiting and running request, unpack the weights and restore the model's mode. Call it from
        the thread that calls `step()` (or when no step runs); the scheduler takes new requests afterwards."""
        with self._lock:
            self._waiting.clear()
            self._cancelled.clear()
        self._batch.close()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _event(self, row: Row) -> TokenEvent:
        return TokenEvent(
            request_id=row.request.id, sample_index=row.sample_index,
            token_id=row.token_ids[-1], logprob=row.logprobs[-1], raw_logprob=row.raw_logprobs[-1],
            text=self._text_delta(row) if self.tokenizer is not None else None, finish_reason=row.finish_reason,
        )

    def _text_delta(self, row: Row) -> str:
        """The row's text not yet streamed, holding back what may still change (see `TokenEvent.text`)."""
        assert self.tokenizer is not None
        if row.finish_reason is not None:
            final = row.text if row.text is not None else self.tokenizer.decode(row.token_ids)
            delta, row.emitted = final[row.emitted:], len(final)
            return delta
        text = self.tokenizer.decode(row.token_ids)
        end = len(text) - held_back(text, row.request.params.stop_strings or [])
        while end > row.emitted and text[end - 1] == "\ufffd":  # bytes of a character still being generated
            end -= 1
        if end <= row.emitted:
            return ""
        delta, row.emitted = text[row.emitted : end], end
        return delta


def held_back(text: str, stop_strings: list[str]) -> int:
    """Characters at the end of `text` that could begin a stop string (the longest such suffix): they may yet be
    cut, so they are not streamed until the next token decides."""
    longest = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest

