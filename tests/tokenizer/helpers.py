"""Small in-code tokenizers and conversations for the tokenizer tests (no downloads)."""

from __future__ import annotations

import functools

from alignkit.tokenizer import Tokenizer, train_bpe

CORPUS = [
    "Hello world, it's a sunny day! I'll see you'RE there at 10:30.",
    "Numbers 1234567 and 3.14159, spaces   and\ttabs\n\nnew paragraphs.",
    "def square(x):\n    return x ** 2  # the square\n",
    "Ünïcödé façade naïve café, 日本語のテキスト, Привет мир, مرحبا, emoji 🤖🎉.",
    "The assistant answers briefly. The user asks questions. System prompts set the tone.",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, of course."},
    {"role": "user", "content": "And café × 3?"},
    {"role": "assistant", "content": "  Three cafés.\n"},
]


@functools.cache
def tiny_tokenizer(template: str) -> Tokenizer:
    """A byte-level BPE with ChatML or Llama 3 special tokens, trained on CORPUS (shared: do not mutate it)."""
    return train_bpe(CORPUS * 20, vocab_size=600, template=template)
