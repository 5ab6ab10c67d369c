"""Bad input: every malformed request gets an OpenAI-style error object with a 4xx status, and the server keeps
serving. In process (starlette's TestClient), with a scripted scheduler: no model is needed to reject a request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.serve.conftest import MODEL_NAME, ScriptedScheduler, char_tokenizer, scripted_app

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD_CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app, worker = scripted_app(char_tokenizer(), ScriptedScheduler(), api_key=KEY, max_body_bytes=64 * 1024)
    worker.start()
    try:
        with TestClient(app) as test_client:
            yield test_client
    finally:
        worker.close()


def chat(**changes: Any) -> dict[str, Any]:
    body = dict(GOOD_CHAT)
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key)
        else:
            body[key] = value
    return body


_DROP = object()

# (name, path, body or raw bytes, status, param, code): each must come back as exactly this error.
CASES: list[tuple[str, str, Any, int, str | None, str | None]] = [
    ("malformed json", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None, "invalid_json"),
    ("not json at all", "/v1/chat/completions", b"hello", 400, None, "invalid_json"),
    ("not utf-8", "/v1/chat/completions", b'{"model": "\xff\xfe"}', 400, None, "invalid_json"),
    ("empty body", "/v1/chat/completions", b"", 400, None, "invalid_json"),
    ("json array", "/v1/chat/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("deep nesting", "/v1/chat/completions", b"[" * 50_000, 400, None, "invalid_json"),
    ("missing messages", "/v1/chat/completions", chat(messages=_DROP), 400, "messages", None),
    ("empty messages", "/v1/chat/completions", chat(messages=[]), 400, "messages", None),
    ("messages not a list", "/v1/chat/completions", chat(messages="hi"), 400, "messages", None),
    ("message not an object", "/v1/chat/completions", chat(messages=["hi"]), 400, "messages[0]", None),
    ("bad role", "/v1/chat/completions", chat(messages=[{"role": "tool", "content": "x"}]), 400,
     "messages[0].role", None),
    ("content wrong type", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages[0].content", None),
    ("image part", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages[0].content", None),
    ("missing model", "/v1/chat/completions", chat(model=_DROP), 400, "model", None),
    ("model wrong type", "/v1/chat/completions", chat(model=3), 400, "model", None),
    ("unknown model", "/v1/chat/completions", chat(model="gpt-4o"), 404, "model", "model_not_found"),
    ("max_tokens zero", "/v1/chat/completions", chat(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens string", "/v1/chat/completions", chat(max_tokens="5"), 400, "max_tokens", None),
    ("max_tokens fraction", "/v1/chat/completions", chat(max_tokens=2.5), 400, "max_tokens", None),
    ("max_tokens beyond context", "/v1/chat/completions", chat(max_tokens=10_000), 400, "max_tokens",
     "context_length_exceeded"),
    ("prompt fills the context", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "x" * 300}]), 400, "messages", "context_length_exceeded"),
    ("n too large", "/v1/chat/completions", chat(n=9), 400, "n", None),
    ("n zero", "/v1/chat/completions", chat(n=0), 400, "n", None),
    ("n boolean", "/v1/chat/completions", chat(n=True), 400, "n", None),
    ("temperature negative", "/v1/chat/completions", chat(temperature=-1), 400, "temperature", None),
    ("temperature string", "/v1/chat/completions", chat(temperature="hot"), 400, "temperature", None),
    ("top_p zero", "/v1/chat/completions", chat(top_p=0), 400, "top_p", None),
    ("stop wrong type", "/v1/chat/completions", chat(stop=[1, 2]), 400, "stop", None),
    ("too many stops", "/v1/chat/completions", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("seed negative", "/v1/chat/completions", chat(seed=-3), 400, "seed", None),
    ("stream not bool", "/v1/chat/completions", chat(stream="yes"), 400, "stream", None),
    ("stream_options without stream", "/v1/chat/completions", chat(stream_options={"include_usage": True}), 400,
     "stream_options", None),
    ("unsupported field", "/v1/chat/completions", chat(tools=[{"type": "function"}]), 400, "tools",
     "unsupported_field"),
    ("penalty not implemented", "/v1/chat/completions", chat(presence_penalty=0.5), 400, "presence_penalty",
     "unsupported_field"),
    ("top_logprobs", "/v1/chat/completions", chat(logprobs=True, top_logprobs=3), 400, "top_logprobs",
     "unsupported_field"),
    ("typo'd field", "/v1/chat/completions", chat(max_token=5), 400, "max_token", "unsupported_field"),
    ("completion without prompt", "/v1/completions", {"model": MODEL_NAME}, 400, "prompt", None),
    ("prompt wrong type", "/v1/completions", {"model": MODEL_NAME, "prompt": {"a": 1}}, 400, "prompt", None),
    ("token id outside vocab", "/v1/completions", {"model": MODEL_NAME, "prompt": [1, 2, 999]}, 400, "prompt", None),
    ("several prompts", "/v1/completions", {"model": MODEL_NAME, "prompt": ["a", "b"]}, 400, "prompt", None),
    ("legacy logprobs 5", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "logprobs": 5}, 400,
     "logprobs", None),
    ("echo", "/v1/completions", {"model": MODEL_NAME, "prompt": "a", "echo": True}, 400, "echo",
     "unsupported_field"),
]


def post(client: TestClient, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers={**AUTH, "Content-Type": "application/json", **(headers or {})})


def assert_error(response: Any, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"].endswith("."), error["message"]
    assert error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_an_openai_error(client: TestClient, case: tuple) -> None:
    _, path, body, status, param, code = case
    assert_error(post(client, path, body), status, param, code)


def test_unsupported_fields_are_all_named(client: TestClient) -> None:
    error = assert_error(post(client, "/v1/chat/completions", chat(frequency_penalty=1.0, response_format={})), 400)
    assert "'frequency_penalty'" in error["message"] and "'response_format'" in error["message"]


def test_no_op_values_of_unsupported_fields_are_accepted(client: TestClient) -> None:
    response = post(client, "/v1/chat/completions", chat(presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                                                         user="someone", top_logprobs=0))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("headers, status_text", [
    ({"Authorization": "Bearer wrong"}, "The API key is wrong"),
    ({"Authorization": ""}, "No API key was sent"),
    ({"Authorization": KEY}, "The API key is wrong"),  # the key without "Bearer "
])
def test_wrong_or_missing_api_key_is_401(client: TestClient, headers: dict[str, str], status_text: str) -> None:
    for path, method in (("/v1/chat/completions", "POST"), ("/v1/models", "GET")):
        response = client.request(method, path, content=json.dumps(GOOD_CHAT), headers=headers)
        error = assert_error(response, 401, code="invalid_api_key")
        assert error["message"].startswith(status_text)


def test_page_and_health_need_no_key(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_body_over_the_limit_is_413_with_and_without_content_length(client: TestClient) -> None:
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * 1_048_576}])).encode()
    assert len(big) > 1_000_000
    assert_error(post(client, "/v1/chat/completions", big), 413, code="request_too_large")

    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to trust, counted while read
        for start in range(0, len(big), 65536):
            yield big[start: start + 65536]

    response = client.post("/v1/chat/completions", content=chunks(), headers=AUTH)
    assert_error(response, 413, code="request_too_large")


def test_unknown_routes_and_methods_are_error_objects(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing", headers=AUTH), 404, code="not_found")
    assert_error(client.get("/v1/chat/completions", headers=AUTH), 405, code="method_not_allowed")
    assert_error(client.get("/v1/models/other", headers=AUTH), 404, code="model_not_found")
    assert client.get(f"/v1/models/{MODEL_NAME}", headers=AUTH).json()["id"] == MODEL_NAME


def test_a_thousand_malformed_requests_then_a_good_one(client: TestClient) -> None:
    """The server neither crashes nor leaks capacity under a stream of garbage, and then answers normally."""
    start = time.perf_counter()
    statuses: dict[int, int] = {}
    for i in range(1000):
        _, path, body, status, _, _ = CASES[i % len(CASES)]
        response = post(client, path, body)
        assert 400 <= response.status_code < 500 and "error" in response.json()
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    elapsed = time.perf_counter() - start
    assert set(statuses) == {400, 404}
    worker = client.app.state.serve.worker  # type: ignore[attr-defined]
    assert worker.held == 0, "a rejected request must not hold a batch slot"
    response = post(client, "/v1/chat/completions", GOOD_CHAT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello there, how can "}
    assert body["choices"][0]["finish_reason"] == "length"
    print(f"1000 malformed requests in {elapsed:.2f}s")
