"""The worker thread and the request lifecycle, with a scripted scheduler (no model): requests join and leave the
running batch between steps, each with its own settings; a full queue is 429; a slow request times out; a client
that hangs up frees its slot; a failed decode step fails its requests and the server goes on."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from alignkit.serve.server import BackgroundServer
from tests.serve.conftest import MODEL_NAME, ScriptedScheduler, char_tokenizer, scripted_app

LONG_REPLY = " ".join(f"w{i}" for i in range(40))


def chat(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **extra}


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def run_app(app: Any, worker: Any, scenario: Callable[[httpx.AsyncClient], Any]) -> Any:
    """Run `scenario(client)` against the app in process; the worker thread runs beside the event loop."""
    async def main() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            return await asyncio.wait_for(scenario(client), timeout=60)

    worker.start()
    try:
        return asyncio.run(main())
    finally:
        worker.close()


def test_requests_join_and_leave_the_running_batch_between_steps() -> None:
    scheduler = ScriptedScheduler(reply=LONG_REPLY, step_delay=0.01)
    app, worker = scripted_app(char_tokenizer(), scheduler)

    async def scenario(client: httpx.AsyncClient) -> list[Any]:
        long = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(30, temperature=0)))
        while len(scheduler.step_log) < 5:  # the long request is decoding alone
            await asyncio.sleep(0.005)
        short = await client.post("/v1/chat/completions", json=chat(3, temperature=0.5, n=2, seed=3))
        return [await long, short]

    long, short = run_app(app, worker, scenario)
    assert long.status_code == short.status_code == 200
    log = scheduler.step_log
    first, second = 1, 2
    joined = [i for i, running in enumerate(log) if running == {first, second}]
    assert joined, "the short request never decoded in the same step as the long one"
    assert log[0] == {first} and log[joined[0] - 1] == {first}, "it joined between steps, not at the start"
    assert log[joined[-1] + 1] == {first}, "it left while the long one went on"
    assert len(joined) == 3 and len(log) == 30
    # Each request reached the scheduler with its own settings.
    assert (scheduler.params[first].max_new_tokens, scheduler.params[first].temperature, scheduler.params[first].n) \
        == (30, 0.0, 1)
    assert (scheduler.params[second].max_new_tokens, scheduler.params[second].temperature,
            scheduler.params[second].n, scheduler.params[second].seed) == (3, 0.5, 2, 3)
    assert len(short.json()["choices"]) == 2
    assert worker.held == 0 and worker.completed == 2


def test_full_queue_is_429_and_frees_up() -> None:
    scheduler = ScriptedScheduler(max_batch_size=1, reply=LONG_REPLY, step_delay=0.01)
    app, worker = scripted_app(char_tokenizer(), scheduler, max_batch_size=1, max_queue=1)

    async def scenario(client: httpx.AsyncClient) -> list[Any]:
        requests = [client.post("/v1/chat/completions", json=chat(5)) for _ in range(3)]
        responses = await asyncio.gather(*requests)
        after = await client.post("/v1/chat/completions", json=chat(5))
        return [*responses, after]

    *burst, after = run_app(app, worker, scenario)
    assert sorted(r.status_code for r in burst) == [200, 200, 429]
    rejected = next(r for r in burst if r.status_code == 429)
    assert rejected.json()["error"]["code"] == "queue_full" and rejected.headers["retry-after"] == "1"
    assert after.status_code == 200, "capacity comes back when requests finish"


@pytest.mark.parametrize("stream", [False, True])
def test_timeout_stops_the_request(stream: bool) -> None:
    scheduler = ScriptedScheduler(reply=LONG_REPLY, step_delay=0.02)
    app, worker = scripted_app(char_tokenizer(), scheduler, timeout=0.3)

    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        response = await client.post("/v1/chat/completions", json=chat(40, stream=stream))
        for _ in range(200):  # the worker thread takes the cancel at its next step boundary
            if scheduler.cancelled:
                break
            await asyncio.sleep(0.01)
        return response

    start = time.perf_counter()
    response = run_app(app, worker, scenario)
    assert time.perf_counter() - start < 0.3 + 0.5 * 40 * 0.02, "it should stop at the timeout, not run to the end"
    if stream:  # the status was sent with the first event; the error comes as the last event before [DONE]
        blocks = [b[len("data: "):] for b in response.text.split("\n\n") if b]
        assert blocks[-1] == "[DONE]"
        error = json.loads(blocks[-2])["error"]
    else:
        assert response.status_code == 504
        error = response.json()["error"]
    assert error["code"] == "timeout" and error["type"] == "timeout_error"
    assert scheduler.cancelled == [1] and worker.held == 0


def test_failed_step_fails_its_requests_and_the_server_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    scheduler = ScriptedScheduler(fail_on_step=0)
    app, worker = scripted_app(char_tokenizer(), scheduler)

    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        failed = await client.post("/v1/chat/completions", json=chat(4))
        return [failed, await client.post("/v1/chat/completions", json=chat(4))]

    failed, good = run_app(app, worker, scenario)
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    assert "simulated decode failure" in failed.json()["error"]["message"]
    assert "the decode step failed" in caplog.text
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == "Hello there, how can "


def test_client_that_hangs_up_frees_its_slot() -> None:
    """Over real HTTP: a streaming client that closes after the first event, and a non-streaming one that closes
    its socket while waiting, are both cancelled in the scheduler long before their answers would end."""
    scheduler = ScriptedScheduler(reply=LONG_REPLY, step_delay=0.1)  # 40 words: 4 s per request
    app, worker = scripted_app(char_tokenizer(), scheduler)
    worker.start()
    try:
        with BackgroundServer(app) as server:
            with httpx.Client(base_url=server.url, timeout=10, trust_env=False) as client:
                with client.stream("POST", "/v1/chat/completions", json=chat(40, stream=True)) as response:
                    assert response.status_code == 200
                    next(response.iter_lines())
                assert wait_until(lambda: scheduler.cancelled == [1] and worker.held == 0, timeout=3)

            host, port = server.url.removeprefix("http://").split(":")
            body = json.dumps(chat(40)).encode()
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                            b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                assert wait_until(lambda: 2 in scheduler.running, timeout=2)
            assert wait_until(lambda: scheduler.cancelled == [1, 2] and worker.held == 0, timeout=3)
            assert worker.completed == 0
    finally:
        worker.close()
