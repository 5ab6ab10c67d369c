"""SmolLM2-135M-Instruct (fp32) behind the server: one greedy request through the official client returns exactly
`generate()`'s text, streamed and not."""

from __future__ import annotations

import httpx
import pytest
import torch

import alignkit
from alignkit.generation import SamplingParams, generate
from alignkit.serve.server import BackgroundServer, build_app

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Give me two tips for sleeping well."}]


@pytest.mark.slow
def test_smollm2_greedy_request_equals_generate(smollm2_gguf: str) -> None:
    model, tokenizer = alignkit.load(smollm2_gguf, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True).input_ids
    [expected] = generate(model, [ids], SamplingParams(max_new_tokens=48, temperature=0), tokenizer=tokenizer)
    assert len(expected.text) > 40
    app, worker = build_app(model, tokenizer, model_name="smollm2")
    worker.start()
    try:
        with BackgroundServer(app) as server, httpx.Client(trust_env=False, timeout=120) as http:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, http_client=http)
            answer = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=48, temperature=0)
            stream = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=48, temperature=0,
                                                    stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        worker.close()
    assert answer.choices[0].message.content == expected.text
    assert streamed == expected.text
    assert answer.usage.completion_tokens == len(expected.token_ids)
