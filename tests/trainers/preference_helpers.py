"""Tiny models and in-code preference pairs shared by the rm / dpo trainer tests and the scoring tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from alignkit.checkpoint import save_hf_model
from alignkit.model import LlamaForCausalLM, ModelConfig
from alignkit.trainers.common import load_tokenizer

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=256)
WORDS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]


def tiny_base(directory: Path, *, seed: int = 0) -> str:
    """A tiny random causal LM with the byte-level tokenizer (ChatML template), saved as an HF directory."""
    tokenizer = load_tokenizer("byte")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, **TINY))
    model.init_weights()
    save_hf_model(model, directory, tokenizer=tokenizer)
    return str(directory)


def fruit_pairs(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Pairs a tiny model can learn: the chosen answer names the fruit after the asked one, the rejected one
    names another fruit."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        i = int(torch.randint(0, len(WORDS), (1,), generator=g))
        j = (i + 2 + int(torch.randint(0, len(WORDS) - 2, (1,), generator=g))) % len(WORDS)
        out.append({"prompt": f"after {WORDS[i]}?", "chosen": WORDS[(i + 1) % len(WORDS)], "rejected": WORDS[j]})
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def marked_pairs(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Pairs with a surface rule a tiny reward model learns in a few steps: chosen answers end with "!"."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        i, j = (int(v) for v in torch.randint(0, len(WORDS), (2,), generator=g))
        out.append({"prompt": f"after {WORDS[i]}?", "chosen": f"{WORDS[j]}!", "rejected": f"{WORDS[(j + 3) % 8]}."})
    return out
