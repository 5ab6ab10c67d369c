"""SmolLM2-135M-Instruct (the real GGUF): greedy chat answers, token-identical to `transformers`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from alignkit.generation import SamplingParams, generate

transformers = pytest.importorskip("transformers")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_greedy_chat_answer_matches_transformers(smollm2_gguf: str) -> None:
    import alignkit

    model, tokenizer = alignkit.load(smollm2_gguf)
    assert tokenizer is not None
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True).input_ids
    ours = generate(model, [prompt], SamplingParams(max_new_tokens=30, temperature=0), tokenizer=tokenizer)[0]
    assert "Paris" in (ours.text or "")

    directory, name = os.path.split(smollm2_gguf)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    hf_prompt = hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    if not isinstance(hf_prompt, list):
        hf_prompt = hf_prompt["input_ids"]
    assert prompt == hf_prompt
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([hf_prompt]), max_new_tokens=30, do_sample=False)[0, len(prompt):]
    # transformers stops on the GGUF's EOS (<|im_end|>) and includes it, as alignkit does.
    assert ours.token_ids == theirs.tolist()
    assert ours.finish_reason == "stop" and ours.token_ids[-1] in tokenizer.stop_token_ids


@pytest.mark.slow
def test_cli_chat_answers_paris(smollm2_gguf: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "generate", "--model", smollm2_gguf,
         "--chat", "What is the capital of France?", "--max-new-tokens", "20"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert any("Paris" in line for line in result.stdout.splitlines())
    assert "loading" in result.stderr and "loading" not in result.stdout
