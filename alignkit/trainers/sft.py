"""Supervised fine-tuning on instruction or chat records; the loss covers the assistant's tokens only.

Records are rendered with the chat template; the targets are each assistant message's content and its
end-of-turn token, never what the user, the system prompt or the template glue wrote.
"""

from __future__ import annotations

from alignkit.errors import ConfigError
from alignkit.tokenizer import set_chat_template
from alignkit.trainers.common import RunResult, add_lora, build_model, load_tokenizer, setup
from alignkit.trainers.configs import SFTConfig
from alignkit.trainers.language import load_examples, train_language_model

Config = SFTConfig


def train(cfg: SFTConfig) -> RunResult:
    info = setup(cfg.train)
    if cfg.data.format in ("text", "preference"):
        raise ConfigError(
            f"SFT trains on instruction or chat records, not data.format {cfg.data.format!r}; use `alignkit train "
            "pretrain` for raw text or `alignkit train dpo` / `rm` for preference pairs."
        )

    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    model, tokenizer = build_model(cfg.model, tokenizer, device=info.device)
    set_chat_template(tokenizer, cfg.chat_template)
    add_lora(model, cfg.lora)

    # Data: validated and tokenised (assistant masks from the chat template) before the run directory is touched.
    train_examples, eval_examples = load_examples(cfg.data, tokenizer)

    return train_language_model(cfg, model, tokenizer, train_examples, eval_examples, info)
