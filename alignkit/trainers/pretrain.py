"""Causal language modelling on raw text, from scratch (`model.init`) or continued from a checkpoint.

Every token of every document is a target. Long documents are cut into `data.max_length` chunks and packed into
full rows, with attention kept inside each document.
"""

from __future__ import annotations

from alignkit.trainers.common import (
    RunResult,
    add_lora,
    build_model,
    load_tokenizer,
    read_records,
    saved_tokenizer,
    setup,
)
from alignkit.trainers.configs import PretrainConfig
from alignkit.trainers.language import load_examples, train_language_model

Config = PretrainConfig


def train(cfg: PretrainConfig) -> RunResult:
    info = setup(cfg.train)

    # Tokenizer: the model's own, a path, or built here for a from-scratch run ("byte", "bpe:N" on the train text).
    tokenizer = saved_tokenizer(cfg)
    if tokenizer is None and cfg.tokenizer is not None:
        texts = []
        if cfg.tokenizer.startswith("bpe:"):
            texts = [r.get(cfg.data.text_field, "") for source in cfg.data.sources
                     for r in read_records(source, cfg.data)]
        tokenizer = load_tokenizer(cfg.tokenizer, texts=texts)
    model, tokenizer = build_model(cfg.model, tokenizer, device=info.device)
    add_lora(model, cfg.lora)

    # Data: validated and tokenised before anything is written to the run directory.
    train_examples, eval_examples = load_examples(cfg.data, tokenizer, format="text")

    return train_language_model(cfg, model, tokenizer, train_examples, eval_examples, info)
