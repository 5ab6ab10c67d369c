"""Tokenizers: Hugging Face / GGUF loading, chat templates with SFT assistant masks, and BPE training."""

from __future__ import annotations

from alignkit.tokenizer.templates import (
    CHATML_TEMPLATE,
    LLAMA3_TEMPLATE,
    default_template_for,
    get_template,
    set_chat_template,
)
from alignkit.tokenizer.tokenizer import ChatEncoding, Tokenizer
from alignkit.tokenizer.train import train_bpe

__all__ = [
    "CHATML_TEMPLATE",
    "LLAMA3_TEMPLATE",
    "ChatEncoding",
    "Tokenizer",
    "default_template_for",
    "get_template",
    "set_chat_template",
    "train_bpe",
]
