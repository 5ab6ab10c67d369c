"""The API on a tiny model: answers equal `generate()`'s, streamed text equals the whole answer, the sampling
fields reach the decoder (n, seed, stop, max_tokens), usage and log-probs are right. In process (TestClient)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from alignkit.generation import SamplingParams, generate
from alignkit.serve.server import build_app
from tests.serve.conftest import MODEL_NAME, char_tokenizer, make_scheduler, tiny_model

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[TestClient, Any, Any]]:
    model, tokenizer = tiny_model(), char_tokenizer()
    app, worker = build_app(model, tokenizer, model_name=MODEL_NAME, scheduler=make_scheduler(model, tokenizer, 8))
    worker.start()
    try:
        with TestClient(app) as client:
            yield client, model, tokenizer
    finally:
        worker.close()


def reference(model: Any, tokenizer: Any, prompt_ids: list[int], **params: Any) -> Any:
    return generate(model, [prompt_ids], SamplingParams(**params), tokenizer=tokenizer)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True).input_ids


def events(response: Any) -> list[Any]:
    """The server-sent events of a streamed response: parsed JSON, and the final "[DONE]" as a string."""
    out = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_greedy_chat_equals_generate(setup: tuple) -> None:
    client, model, tokenizer = setup
    ids = chat_ids(tokenizer, MESSAGES)
    [expected] = reference(model, tokenizer, ids, max_new_tokens=24, temperature=0)
    response = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES,
                                                         "max_tokens": 24, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL_NAME and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == expected.finish_reason
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected.token_ids),
                             "total_tokens": len(ids) + len(expected.token_ids)}


def test_streamed_chat_equals_the_whole_answer(setup: tuple) -> None:
    client, model, tokenizer = setup
    request = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 20, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=request).json()
    streamed = client.post("/v1/chat/completions", json={**request, "stream": True,
                                                         "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = events(streamed)
    assert chunks[-1] == "[DONE]"
    usage_chunk = chunks[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    deltas = [c["choices"][0] for c in chunks[:-2]]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks[:-1])
    assert "".join(d["delta"].get("content", "") for d in deltas) == whole["choices"][0]["message"]["content"]
    assert [d["finish_reason"] for d in deltas].count(None) == len(deltas) - 1
    assert deltas[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]
    # Without include_usage there is no usage event.
    plain = events(client.post("/v1/chat/completions", json={**request, "stream": True}))
    assert all("usage" not in c for c in plain[:-1])


def test_completions_text_and_token_prompts_with_logprobs(setup: tuple) -> None:
    client, model, tokenizer = setup
    prompt = "The cat sat on"
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    [expected] = reference(model, tokenizer, ids, max_new_tokens=12, temperature=0)
    for sent in (prompt, ids):
        body = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": sent, "max_tokens": 12,
                                                    "temperature": 0, "logprobs": 1}).json()
        [choice] = body["choices"]
        assert body["object"] == "text_completion" and choice["text"] == expected.text
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(expected.token_ids) == body["usage"]["completion_tokens"]
        # The reported log-prob is the model's own (raw logits), as generate() returns it.
        assert logprobs["token_logprobs"] == pytest.approx(expected.raw_logprobs, abs=1e-4)
        assert logprobs["text_offset"][0] == 0
    streamed = events(client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 12,
                                                           "temperature": 0, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == expected.text


def test_chat_logprobs_have_openai_shape(setup: tuple) -> None:
    client, model, tokenizer = setup
    [expected] = reference(model, tokenizer, chat_ids(tokenizer, MESSAGES), max_new_tokens=6, temperature=0)
    body = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 6,
                                                     "temperature": 0, "logprobs": True}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx(expected.raw_logprobs, abs=1e-4)
    assert [c["token"] for c in content] == [tokenizer.decode([t], skip_special_tokens=False)
                                             for t in expected.token_ids]
    assert all(c["bytes"] == list(c["token"].encode()) and c["top_logprobs"] == [] for c in content)


def test_n_samples_follow_the_seed(setup: tuple) -> None:
    client, model, tokenizer = setup
    request = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 16, "temperature": 1.0, "n": 3, "seed": 7}

    def texts(**changes: Any) -> list[str]:
        body = client.post("/v1/chat/completions", json={**request, **changes}).json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        return [c["message"]["content"] for c in body["choices"]]

    first = texts()
    assert texts() == first, "the same seed must give the same samples"
    assert len(set(first)) == 3, "three samples of a near-uniform tiny model should differ"
    assert texts(seed=8) != first
    expected = reference(model, tokenizer, chat_ids(tokenizer, MESSAGES), max_new_tokens=16, temperature=1.0, n=3,
                         seed=7)
    assert first == [c.text for c in expected], "a seeded request samples what generate() samples"


def test_stop_string_and_max_tokens(setup: tuple) -> None:
    client, model, tokenizer = setup
    [free] = reference(model, tokenizer, chat_ids(tokenizer, MESSAGES), max_new_tokens=30, temperature=0,
                       stop_token_ids=[])
    stop = free.text[6:8]
    cut = free.text[: free.text.find(stop)]
    body = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 30,
                                                     "temperature": 0, "stop": [stop]}).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == cut

    body = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 3,
                                                     "temperature": 0}).json()
    tokens = body["usage"]["completion_tokens"]
    assert tokens <= 3 and (tokens == 3) == (body["choices"][0]["finish_reason"] == "length")


def test_ignore_eos_decodes_exactly_max_tokens(setup: tuple) -> None:
    client, model, tokenizer = setup
    ids = chat_ids(tokenizer, MESSAGES)
    [free] = reference(model, tokenizer, ids, max_new_tokens=40, temperature=0, stop_token_ids=[])
    body = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 40,
                                                     "temperature": 0, "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] == 40 and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == free.text
