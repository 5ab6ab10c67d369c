"""Tiny models, a one-character-per-token tokenizer, task files, and the plain reference scorer for the few-shot
evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from alignkit.model import LlamaForCausalLM
from alignkit.tokenizer import Tokenizer
from tests.conftest import tiny_config


def tiny_model(**overrides: Any) -> LlamaForCausalLM:
    """A random 2-layer GQA Llama with perturbed norms (so parity cannot pass by accident), in eval mode."""
    model = LlamaForCausalLM(tiny_config(**overrides))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def char_tokenizer() -> Tokenizer:
    """One token per character: id 0 is <|endoftext|> (EOS), ids 1..95 the printable ASCII characters, 96 "\\n"."""
    vocab = {"<|endoftext|>": 0, **{chr(c): c - 31 for c in range(32, 127)}, "\n": 96}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, eos_token="<|endoftext|>")


def plain_loglikelihood(model: LlamaForCausalLM, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The reference: one full forward over context + continuation (left-truncated to the window as
    lm-evaluation-harness does), log_softmax, gather the continuation's tokens, sum; greedy = every argmax hits."""
    window = model.config.max_position_embeddings
    tokens = (context + continuation)[-(window + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))[0].double()
    logps = logits.log_softmax(-1)[-len(continuation):]
    targets = torch.tensor(tokens[-len(continuation):])
    total = float(logps.gather(-1, targets[:, None]).sum())
    greedy = bool((logits[-len(continuation):].argmax(-1) == targets).all())
    return total, greedy


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Small tasks in the three layouts, with text the character tokenizer covers.
CHOICE_RECORDS = [
    {"query": "Question: 1+1?", "choices": ["2", "3", "11"], "gold": 0},
    {"query": "Question: sky?", "choices": ["blue", "green"], "gold": 0},
    {"query": "Question: 2+2?", "choices": ["5", "4", "22"], "gold": 1},
    {"query": "Question: cat says?", "choices": ["moo", "meow"], "gold": 1},
    {"query": "Question: opposite of up?", "choices": ["down", "left", "in"], "gold": 0},
    {"query": "Question: 3+3?", "choices": ["6", "9"], "gold": 0},
]
PARTIAL_RECORDS = [
    {"context_options": ["Ann gave Bo a gift because Ann", "Ann gave Bo a gift because Bo"],
     "continuation": "was generous.", "gold": 0},
    {"context_options": ["Cy thanked Di because Cy", "Cy thanked Di because Di"],
     "continuation": "had helped.", "gold": 1},
    {"context_options": ["Ed beat Flo at chess since Ed", "Ed beat Flo at chess since Flo"],
     "continuation": "played better.", "gold": 0},
    {"context_options": ["Gus lent Hal a pen as Gus", "Gus lent Hal a pen as Hal"],
     "continuation": "had none.", "gold": 1},
]
CONTINUATION_RECORDS = [
    {"context": "the cat sat on the", "continuation": "mat"},
    {"context": "one two three four", "continuation": "five"},
    {"context": "red green", "continuation": "blue"},
    {"context": "a b c d e f", "continuation": "g"},
]
