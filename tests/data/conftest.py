"""Small byte-level BPE tokenizers with the Llama 3 and ChatML templates, trained in code on a few sentences."""

from __future__ import annotations

import functools

import pytest

from alignkit.tokenizer import Tokenizer, train_bpe

SENTENCES = [
    "You are a helpful assistant. Be brief.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke about cats. Cats sleep all day, then complain about being tired.",
    "Add 2 and 3. The answer is 5.",
    "Hello there, how are you today? I am fine, thank you!",
] * 4


@functools.cache
def small_tokenizer(template: str) -> Tokenizer:
    return train_bpe(SENTENCES, vocab_size=400, template=template)


@pytest.fixture(params=["llama3", "chatml"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return small_tokenizer(request.param)
