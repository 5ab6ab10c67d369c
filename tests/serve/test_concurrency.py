"""64 concurrent clients, several requests each, over real HTTP on 127.0.0.1: every one is answered, with zero
errors, and each greedy answer is the one `generate()` gives its prompt alone (batching changes nothing)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from alignkit.generation import SamplingParams, generate
from alignkit.serve.server import BackgroundServer, build_app
from tests.serve.conftest import MODEL_NAME, char_tokenizer, make_scheduler, tiny_model

CLIENTS = 64
REQUESTS_PER_CLIENT = 3
MAX_TOKENS = 12
TIME_LIMIT_S = 240.0


def question(client: int, turn: int) -> str:
    return f"Client {client}, question {turn}: what is {client * 7 + turn}?"


@pytest.mark.slow
def test_64_concurrent_clients_all_answered() -> None:
    model, tokenizer = tiny_model(), char_tokenizer()
    app, worker = build_app(model, tokenizer, model_name=MODEL_NAME, max_batch_size=8, max_queue=CLIENTS,
                            scheduler=make_scheduler(model, tokenizer, 8))
    prompts = {(c, t): tokenizer.apply_chat_template([{"role": "user", "content": question(c, t)}],
                                                     add_generation_prompt=True).input_ids
               for c in range(CLIENTS) for t in range(REQUESTS_PER_CLIENT)}
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0)
    expected = {key: generate(model, [ids], params, tokenizer=tokenizer)[0].text for key, ids in prompts.items()}

    async def one_client(base_url: str, c: int) -> list[tuple[tuple[int, int], int, str]]:
        results = []
        async with httpx.AsyncClient(base_url=base_url, timeout=120, trust_env=False) as client:
            for t in range(REQUESTS_PER_CLIENT):
                body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": question(c, t)}],
                        "max_tokens": MAX_TOKENS, "temperature": 0, "stream": (c + t) % 2 == 0}
                if body["stream"]:
                    text, status = "", 0
                    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                        status = response.status_code
                        async for line in response.aiter_lines():
                            if line.startswith("data: {"):
                                chunk = httpx.Response(200, content=line[6:]).json()
                                text += "".join(ch["delta"].get("content") or "" for ch in chunk["choices"])
                else:
                    response = await client.post("/v1/chat/completions", json=body)
                    status = response.status_code
                    text = response.json()["choices"][0]["message"]["content"] if status == 200 else response.text
                results.append(((c, t), status, text))
        return results

    async def run_all(base_url: str) -> list[Any]:
        tasks = [one_client(base_url, c) for c in range(CLIENTS)]
        done = await asyncio.wait_for(asyncio.gather(*tasks), timeout=TIME_LIMIT_S)
        return [r for client_results in done for r in client_results]

    worker.start()
    try:
        with BackgroundServer(app) as server:
            start = time.perf_counter()
            results = asyncio.run(run_all(server.url))
            elapsed = time.perf_counter() - start
    finally:
        worker.close()
    errors = [(key, status, text[:200]) for key, status, text in results if status != 200]
    assert not errors, f"{len(errors)} requests failed, e.g. {errors[:3]}"
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    wrong = [key for key, _, text in results if text != expected[key]]
    assert not wrong, f"{len(wrong)} answers differ from generate()'s, e.g. {wrong[:3]}"
    assert worker.held == 0 and worker.completed == CLIENTS * REQUESTS_PER_CLIENT
    tokens = sum(len(tokenizer.encode(text)) for _, _, text in results)
    # Batching happened: far fewer decode steps than tokens.
    assert worker.steps < tokens / 3, (worker.steps, tokens)
    print(f"{len(results)} requests from {CLIENTS} clients in {elapsed:.1f}s, {worker.steps} steps for ~{tokens} tokens")
