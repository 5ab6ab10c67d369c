"""Fixtures for the server tests: a tiny model with a character tokenizer and a chat template, the decoding
scheduler (the real one, or a stand-in on `generate()` where it is absent), and a scripted scheduler without a
model for the tests of queueing, timeouts, disconnects and failures."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from alignkit.errors import UserError
from alignkit.generation import SamplingParams, generate
from alignkit.model import LlamaForCausalLM
from alignkit.tokenizer import Tokenizer
from tests.conftest import tiny_config

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MODEL_NAME = "tiny"
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer() -> Tokenizer:
    """One token per character: id 0 is <|endoftext|>, 1 is a newline, the rest printable characters."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)] + [chr(c) for c in range(161, 161 + 31)]
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(chars)}}
    assert len(vocab) == 128
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, eos_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(max_position_embeddings=256))
    model.init_weights()
    return model.eval()


@dataclass
class TokenEvent:
    """The scheduler's event type, for the stand-ins (same fields as alignkit.generation.scheduler.TokenEvent)."""

    request_id: int
    sample_index: int
    token_id: int
    logprob: float
    raw_logprob: float
    text: str
    finish_reason: str | None


class StandInScheduler:
    """The Scheduler contract on top of `generate()`: a request is generated whole when admitted and its tokens
    come out one per step, so several requests are in flight together and each has its own settings."""

    def __init__(self, model: LlamaForCausalLM, tokenizer: Tokenizer, max_batch_size: int = 8) -> None:
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.waiting: list[tuple[int, list[int], SamplingParams]] = []
        self.running: dict[int, dict[str, Any]] = {}
        self.next_id = 0

    def add(self, prompt_ids: list[int], params: SamplingParams) -> int:
        if not prompt_ids:
            raise UserError("the prompt is empty")
        self.next_id += 1
        self.waiting.append((self.next_id, list(prompt_ids), params))
        return self.next_id

    def cancel(self, request_id: int) -> None:
        self.waiting = [w for w in self.waiting if w[0] != request_id]
        self.running.pop(request_id, None)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[TokenEvent]:
        rows = sum(r["params"].n for r in self.running.values())
        while self.waiting and rows + self.waiting[0][2].n <= self.max_batch_size:
            request_id, prompt, params = self.waiting.pop(0)
            completions = generate(self.model, [prompt], params, tokenizer=self.tokenizer)
            self.running[request_id] = {"params": params, "completions": completions,
                                        "position": [0] * params.n, "emitted": [0] * params.n}
            rows += params.n
        events = []
        for request_id, state in list(self.running.items()):
            for j, completion in enumerate(state["completions"]):
                k = state["position"][j]
                if k >= len(completion.token_ids):
                    continue
                final = completion.text or ""
                last = k == len(completion.token_ids) - 1
                target = len(final) if last else min(len(self.tokenizer.decode(completion.token_ids[: k + 1])),
                                                      len(final))
                text = final[state["emitted"][j]: target] if target > state["emitted"][j] else ""
                state["emitted"][j] += len(text)
                state["position"][j] = k + 1
                events.append(TokenEvent(request_id, j, completion.token_ids[k], completion.logprobs[k],
                                         completion.raw_logprobs[k], text,
                                         completion.finish_reason if last else None))
            if all(p >= len(c.token_ids) for p, c in zip(state["position"], state["completions"])):
                del self.running[request_id]
        return events


def real_scheduler_available() -> bool:
    try:
        from alignkit.generation.scheduler import Scheduler  # noqa: F401
    except ImportError:
        return False
    return True


def make_scheduler(model: LlamaForCausalLM, tokenizer: Tokenizer, max_batch_size: int = 8) -> Any:
    """The real continuous-batching Scheduler once it exists; the generate()-based stand-in until then."""
    if real_scheduler_available():
        from alignkit.generation.scheduler import Scheduler

        return Scheduler(model, tokenizer, max_batch_size=max_batch_size)
    return StandInScheduler(model, tokenizer, max_batch_size)


class ScriptedScheduler:
    """No model: every sample emits the words of `reply` (one token each) then finishes with "stop", or "length"
    after max_new_tokens. Records which requests were in each step, and cancellations, for the tests."""

    def __init__(self, max_batch_size: int = 8, reply: str = "Hello there, how can I help?", step_delay: float = 0.0,
                 fail_on_step: int | None = None) -> None:
        self.max_batch_size, self.step_delay, self.fail_on_step = max_batch_size, step_delay, fail_on_step
        self.words = [w + " " for w in reply.split(" ")]
        self.words[-1] = self.words[-1].rstrip()
        self.waiting: list[tuple[int, SamplingParams]] = []
        self.running: dict[int, dict[str, Any]] = {}
        self.prompts: dict[int, list[int]] = {}
        self.params: dict[int, SamplingParams] = {}
        self.step_log: list[set[int]] = []
        self.cancelled: list[int] = []
        self.next_id = 0
        self.lock = threading.Lock()  # the tests read the logs from another thread

    def add(self, prompt_ids: list[int], params: SamplingParams) -> int:
        self.next_id += 1
        self.waiting.append((self.next_id, params))
        self.prompts[self.next_id] = list(prompt_ids)
        self.params[self.next_id] = params
        return self.next_id

    def cancel(self, request_id: int) -> None:
        with self.lock:
            self.cancelled.append(request_id)
        self.waiting = [w for w in self.waiting if w[0] != request_id]
        self.running.pop(request_id, None)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[TokenEvent]:
        if self.fail_on_step is not None and len(self.step_log) == self.fail_on_step:
            self.step_log.append(set())
            raise RuntimeError("simulated decode failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        rows = sum(r["params"].n for r in self.running.values())
        while self.waiting and rows + self.waiting[0][1].n <= self.max_batch_size:
            request_id, params = self.waiting.pop(0)
            self.running[request_id] = {"params": params, "position": [0] * params.n}
            rows += params.n
        with self.lock:
            self.step_log.append(set(self.running))
        events = []
        for request_id, state in list(self.running.items()):
            limit = min(len(self.words), state["params"].max_new_tokens)
            for j in range(state["params"].n):
                k = state["position"][j]
                if k >= limit:
                    continue
                state["position"][j] = k + 1
                finish = None
                if k == limit - 1:
                    finish = "stop" if limit == len(self.words) else "length"
                events.append(TokenEvent(request_id, j, 2 + k, -0.5, -0.25, self.words[k], finish))
            if all(p >= limit for p in state["position"]):
                del self.running[request_id]
        return events


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return char_tokenizer()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()


def scripted_app(tokenizer: Tokenizer, scheduler: ScriptedScheduler | None = None, **options: Any) -> tuple[Any, Any]:
    """`(app, worker)` around a scripted scheduler, with the tiny model's limits (context 256, vocabulary 128)."""
    from alignkit.serve.server import build_app

    fake_model = type("FakeModel", (), {"config": tiny_config(max_position_embeddings=256)})()
    scheduler = scheduler or ScriptedScheduler(max_batch_size=options.get("max_batch_size", 8))
    return build_app(fake_model, tokenizer, model_name=MODEL_NAME, scheduler=scheduler, **options)


@pytest.fixture
def running_worker() -> Iterator[list[Any]]:
    """Collects workers a test starts and closes them afterwards, even when the test fails."""
    workers: list[Any] = []
    yield workers
    for worker in workers:
        worker.close()
