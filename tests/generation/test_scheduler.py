"""Continuous batching: requests that join and leave a running batch get exactly what `generate()` gives each alone."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from alignkit.errors import UserError
from alignkit.generation import SamplingParams, generate
from alignkit.generation.packed import packing_available
from alignkit.generation.scheduler import Scheduler, TokenEvent, held_back
from alignkit.model import LlamaForCausalLM
from alignkit.tokenizer import Tokenizer
from tests.conftest import tiny_config
from tests.generation.test_engine import ForwardRecorder, char_tokenizer, prompts_of
from tests.model.test_llama import make


@dataclass
class Sample:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    raw_logprobs: list[float] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)


def collect(events: list[TokenEvent], into: dict[tuple[int, int], Sample]) -> None:
    for e in events:
        sample = into.setdefault((e.request_id, e.sample_index), Sample())
        assert not any(sample.finish), "an event after the sample's last one"
        sample.tokens.append(e.token_id)
        sample.logprobs.append(e.logprob)
        sample.raw_logprobs.append(e.raw_logprob)
        sample.texts.append(e.text)
        sample.finish.append(e.finish_reason)


def run(scheduler: Scheduler, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]
        ) -> tuple[dict[tuple[int, int], Sample], list[int]]:
    """Step until idle, adding arrivals[k] before step k; the samples by (request id, sample index), and the ids in
    the order of the arrivals."""
    samples: dict[tuple[int, int], Sample] = {}
    ids: list[int] = []
    step = 0
    while scheduler.has_work() or any(k >= step for k in arrivals):
        for prompt, params in arrivals.get(step, []):
            ids.append(scheduler.add(prompt, params))
        collect(scheduler.step(), samples)
        step += 1
        assert step < 500
    return samples, ids


def assert_same_as_alone(model: LlamaForCausalLM, samples: dict[tuple[int, int], Sample], ids: list[int],
                         requests: list[tuple[list[int], SamplingParams]], tokenizer: Tokenizer | None = None) -> None:
    for request_id, (prompt, params) in zip(ids, requests):
        alone = generate(model, [prompt], params, tokenizer=tokenizer)
        assert len(alone) == params.n
        for j, completion in enumerate(alone):
            sample = samples[(request_id, j)]
            assert sample.tokens == completion.token_ids, f"request {request_id} sample {j}"
            assert sample.finish[-1] == completion.finish_reason and sample.finish[:-1] == [None] * (
                len(sample.finish) - 1)
            assert sample.raw_logprobs == pytest.approx(completion.raw_logprobs, abs=1e-5)
            assert sample.logprobs == pytest.approx(completion.logprobs, abs=1e-5)
            if tokenizer is not None:
                assert "".join(sample.texts) == completion.text  # type: ignore[arg-type]


def test_requests_joining_at_different_steps_match_generate_alone() -> None:
    model = make(tiny_config())
    short, mid, long, late = prompts_of((3, 6, 30, 4), seed=4)
    free = generate(model, [short], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[]))[0]
    eos = free.token_ids[7]  # so the first request stops early and leaves while others run
    requests = [
        (short, SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[eos])),
        (mid, SamplingParams(max_new_tokens=9, temperature=0, stop_token_ids=[])),
        # Longer than the running cache: the running rows are re-padded to its width when it joins.
        (long, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[])),
        (late, SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=1.4, stop_token_ids=[])),
    ]
    recorder = ForwardRecorder(model)
    samples, ids = run(Scheduler(model, None, max_batch_size=8),
                       {0: requests[:1], 2: requests[1:2], 4: requests[2:3], 9: requests[3:]})
    recorder.handle.remove()
    assert_same_as_alone(model, samples, ids, requests)
    assert samples[(ids[0], 0)].finish[-1] == "stop"
    # Prefills of the joining prompts while the batch decodes; decode steps over rows of several requests.
    assert (1, 30) in recorder.calls and (1, 4) in recorder.calls
    assert max(batch for batch, seq in recorder.calls if seq == 1) >= 3


def test_mixed_sampling_settings_each_seeded_match_generate_alone() -> None:
    """Every request samples its own rows with its own generator, so each draws what it draws alone."""
    model = make(tiny_config())
    prompts = prompts_of((5, 9, 3, 7), seed=2)
    stops = list(range(0, 128, 9))
    requests = [
        (prompts[0], SamplingParams(max_new_tokens=14, temperature=0.7, top_k=10, seed=1, stop_token_ids=[])),
        (prompts[1], SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.8, n=3, seed=2,
                                    stop_token_ids=stops)),
        (prompts[2], SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.3, stop_token_ids=[])),
        (prompts[3], SamplingParams(max_new_tokens=11, temperature=1.3, min_p=0.05, repetition_penalty=1.2,
                                    seed=3, stop_token_ids=stops, min_new_tokens=4)),
    ]
    samples, ids = run(Scheduler(model, None, max_batch_size=8),
                       {0: requests[:2], 3: requests[2:3], 5: requests[3:]})
    assert_same_as_alone(model, samples, ids, requests)
    assert len({tuple(samples[(ids[1], j)].tokens) for j in range(3)}) > 1  # the n samples differ
    # Seeds matter: another seed for request 0 alone gives other tokens.
    other = generate(model, [prompts[0]], SamplingParams(max_new_tokens=14, temperature=0.7, top_k=10, seed=9,
                                                         stop_token_ids=[]))[0]
    assert other.token_ids != samples[(ids[0], 0)].tokens


def test_max_batch_size_queues_requests_in_fifo_order() -> None:
    model = make(tiny_config())
    prompts = prompts_of((4, 5, 6), seed=3)
    params = [SamplingParams(max_new_tokens=4, temperature=1.0, n=2, seed=0, stop_token_ids=[]),
              SamplingParams(max_new_tokens=3, temperature=1.0, n=2, seed=1, stop_token_ids=[]),
              SamplingParams(max_new_tokens=3, temperature=0, stop_token_ids=[])]
    scheduler = Scheduler(model, None, max_batch_size=3)
    ids = [scheduler.add(p, q) for p, q in zip(prompts, params)]
    recorder = ForwardRecorder(model)
    first_step: dict[int, int] = {}
    samples: dict[tuple[int, int], Sample] = {}
    step = 0
    while scheduler.has_work():
        events = scheduler.step()
        for e in events:
            first_step.setdefault(e.request_id, step)
        collect(events, samples)
        step += 1
    recorder.handle.remove()
    # Request 1 (2 rows) does not fit beside request 0 (2 rows) in 3 rows; request 2 (1 row) would, but waits
    # behind it (FIFO), then joins together with it.
    assert first_step == {ids[0]: 0, ids[1]: 4, ids[2]: 4}
    assert max(batch for batch, _ in recorder.calls) <= 3
    assert (2, 6) in recorder.calls  # requests 1 and 2 prefilled together (widths 5 and 6)
    assert_same_as_alone(model, samples, ids, list(zip(prompts, params)))


def test_cancel_frees_the_slot_and_stops_the_events() -> None:
    model = make(tiny_config())
    a, b, c = prompts_of((4, 5, 6), seed=5)
    scheduler = Scheduler(model, None, max_batch_size=2)
    long = SamplingParams(max_new_tokens=50, temperature=0, stop_token_ids=[])
    first, second = scheduler.add(a, long), scheduler.add(b, long)
    waiting = scheduler.add(c, SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=[]))
    never = scheduler.add(c, long)
    scheduler.cancel(never)  # cancelled while waiting: never starts
    samples: dict[tuple[int, int], Sample] = {}
    for _ in range(3):
        collect(scheduler.step(), samples)
    assert (waiting, 0) not in samples  # the batch is full
    scheduler.cancel(first)
    for _ in range(5):
        collect(scheduler.step(), samples)
    assert len(samples[(first, 0)].tokens) == 3  # nothing after the cancel
    assert len(samples[(waiting, 0)].tokens) == 5 and samples[(waiting, 0)].finish[-1] == "length"
    scheduler.cancel(second)
    assert scheduler.step() == [] and not scheduler.has_work()
    assert (never, 0) not in samples
    alone = generate(model, [c], SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=[]))[0]
    assert samples[(waiting, 0)].tokens == alone.token_ids


def test_stop_strings_and_text_deltas_add_up_to_the_completion_text() -> None:
    tokenizer = char_tokenizer()
    model = make(tiny_config())
    prompt = tokenizer.encode("Hello, world")
    free = generate(model, [prompt], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[]),
                    tokenizer=tokenizer)[0]
    text = free.text
    assert text is not None and len(text) == 20
    stop = text[6:9]  # three characters over three tokens
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[], stop_strings=[stop])
    other = tokenizer.encode("abc")
    requests = [(other, SamplingParams(max_new_tokens=15, temperature=0.9, seed=4, stop_token_ids=[],
                                       stop_strings=["xyz"])), (prompt, params)]
    samples, ids = run(Scheduler(model, tokenizer, max_batch_size=4), {0: requests[:1], 1: requests[1:]})
    assert_same_as_alone(model, samples, ids, requests, tokenizer)
    sample = samples[(ids[1], 0)]
    cut = text.find(stop)
    assert sample.finish[-1] == "stop" and "".join(sample.texts) == text[:cut]
    # The stop string's first characters were held back (""), then dropped when it completed.
    assert sample.texts[cut: cut + 3] == ["", "", ""]
    assert held_back("ab" + stop[:2], [stop]) == 2 and held_back("abc", [stop + "!"]) == 0


def byte_fallback_tokenizer() -> Tokenizer:
    """Ids 1-63 are ASCII characters, 64 is the UTF-8 lead byte 0xC3 and 65-127 continuation bytes 0x80-0xBE,
    decoded as bytes: a random model writes characters split over two tokens and stray invalid bytes."""
    vocab = {"<|endoftext|>": 0, **{chr(32 + i): i for i in range(1, 64)}, "<0xC3>": 64}
    vocab.update({f"<0x{0x80 + i:02X}>": 65 + i for i in range(63)})
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return Tokenizer(backend, eos_token="<|endoftext|>")


def test_text_deltas_hold_back_incomplete_characters() -> None:
    tokenizer = byte_fallback_tokenizer()
    assert tokenizer.decode([64]) == "\ufffd" and tokenizer.decode([64, 65 + 0x29]) == "é"
    model = make(tiny_config())
    params = SamplingParams(max_new_tokens=30, temperature=1.0, n=4, seed=11, stop_token_ids=[])
    samples, ids = run(Scheduler(model, tokenizer, max_batch_size=4), {0: [([1, 2, 3], params)]})
    assert_same_as_alone(model, samples, ids, [([1, 2, 3], params)], tokenizer)
    deltas = [t for j in range(4) for t, f in zip(samples[(ids[0], j)].texts, samples[(ids[0], j)].finish)
              if f is None]
    assert any(t == "" for t in deltas)  # something was held back
    assert not any(t and t.endswith("\ufffd") for t in deltas)  # never streamed while it could still change


def test_context_window_clips_new_tokens_and_bad_requests_fail_on_add() -> None:
    model = make(tiny_config(max_position_embeddings=16))
    scheduler = Scheduler(model, None, max_batch_size=2)
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[])
    samples, ids = run(scheduler, {0: [([2] * 14, params)], 1: [([1] * 3, params)]})
    # 14 prompt tokens leave 3 new ones; the 3-token prompt joining later gets all 10, its own bound.
    assert len(samples[(ids[0], 0)].tokens) == 3 and len(samples[(ids[1], 0)].tokens) == 10
    with pytest.raises(UserError, match="the prompt is empty"):
        scheduler.add([], params)
    with pytest.raises(UserError, match="the prompt contains token id 128"):
        scheduler.add([128], params)
    with pytest.raises(UserError, match="the prompt has 17 tokens"):
        scheduler.add([1] * 17, params)
    with pytest.raises(UserError, match="n = 3 samples"):
        scheduler.add([1], SamplingParams(n=3))
    with pytest.raises(UserError, match="stop_strings needs a tokenizer"):
        scheduler.add([1], SamplingParams(stop_strings=["x"]))
    assert not scheduler.has_work()


def test_model_is_restored_when_idle_and_adds_from_another_thread() -> None:
    model = make(tiny_config()).train()
    scheduler = Scheduler(model, None, max_batch_size=4)
    prompts = prompts_of((3, 8, 5, 6), seed=7)
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
    ids: list[int] = []
    adder = threading.Thread(target=lambda: ids.extend(scheduler.add(p, params) for p in prompts))
    samples: dict[tuple[int, int], Sample] = {}
    adder.start()
    while adder.is_alive() or scheduler.has_work():
        collect(scheduler.step(), samples)
    adder.join()
    assert model.training  # restored once idle
    assert not any({"forward", "project_qkv"} & set(vars(m)) for m in model.modules())  # packing undone
    expected = generate(model, prompts, params)
    assert [samples[(i, 0)].tokens for i in ids] == [c.token_ids for c in expected]


def test_cancel_during_a_step_drops_that_steps_events() -> None:
    """`cancel` from another thread can land while `step()` runs: that step returns no events for the request."""
    model = make(tiny_config())
    scheduler = Scheduler(model, None, max_batch_size=4)
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[])
    kept, cancelled = scheduler.add([1, 2, 3], params), scheduler.add([4, 5], params)
    samples: dict[tuple[int, int], Sample] = {}
    collect(scheduler.step(), samples)
    # The cancel arrives inside the next step's decode forward, after that step sampled its tokens.
    handle = model.register_forward_pre_hook(lambda module, args: scheduler.cancel(cancelled))
    events = scheduler.step()
    handle.remove()
    assert [e.request_id for e in events] == [kept]
    collect(events, samples)
    collect(scheduler.step(), samples)
    assert len(samples[(cancelled, 0)].tokens) == 1 and len(samples[(kept, 0)].tokens) == 3


def test_release_when_idle_false_keeps_the_session_until_close() -> None:
    """A server or chat keeps the packed weights between requests (no repacking after every idle moment); close()
    restores the model."""
    model = make(tiny_config()).train()
    params = SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=[])
    expected = generate(model, [[1, 2, 3]], params)[0].token_ids
    packed = packing_available()
    with Scheduler(model, None, max_batch_size=2, release_when_idle=False) as scheduler:
        for _ in range(2):
            samples, ids = run(scheduler, {0: [([1, 2, 3], params)]})
            assert samples[(ids[0], 0)].tokens == expected
            assert not scheduler.has_work() and not model.training  # idle, still in the session
            assert ("forward" in vars(model.lm_head)) == packed
    assert model.training and "forward" not in vars(model.lm_head)
