"""The official `openai` Python client against the server over real HTTP (127.0.0.1): chat and completions,
streamed and not, give generate()'s greedy text; its error classes come out of our error objects."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from alignkit.generation import SamplingParams, generate
from alignkit.serve.server import BackgroundServer, build_app
from tests.serve.conftest import MODEL_NAME, char_tokenizer, make_scheduler, tiny_model

openai = pytest.importorskip("openai")

KEY = "sk-alignkit-test"
MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Any, Any, Any]]:
    model, tokenizer = tiny_model(), char_tokenizer()
    app, worker = build_app(model, tokenizer, model_name=MODEL_NAME, api_key=KEY,
                            scheduler=make_scheduler(model, tokenizer, 8))
    worker.start()
    try:
        with BackgroundServer(app) as server:
            # trust_env=False: a proxy set in the environment must never see loopback test traffic.
            with httpx.Client(trust_env=False, timeout=30) as http:
                client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, http_client=http)
                yield client, model, tokenizer
    finally:
        worker.close()


def greedy(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> Any:
    return generate(model, [prompt_ids], SamplingParams(max_new_tokens=max_new_tokens, temperature=0),
                    tokenizer=tokenizer)[0]


def test_chat_streamed_and_not(served: tuple) -> None:
    client, model, tokenizer = served
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True).input_ids
    expected = greedy(model, tokenizer, ids, 20)
    answer = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.completion_tokens == len(expected.token_ids)

    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_completions_streamed_and_not(served: tuple) -> None:
    client, model, tokenizer = served
    expected = greedy(model, tokenizer, tokenizer.encode("Once upon", add_special_tokens=True), 10)
    answer = client.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=10, temperature=0)
    assert answer.choices[0].text == expected.text
    stream = client.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=10, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected.text


def test_models_and_errors(served: tuple) -> None:
    client, _, _ = served
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="'n' is 99"):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, n=99)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, presence_penalty=1.0)
    wrong = client.with_options(api_key="sk-wrong")
    with pytest.raises(openai.AuthenticationError, match="API key is wrong"):
        wrong.chat.completions.create(model=MODEL_NAME, messages=MESSAGES)
