"""Train a byte-level BPE tokenizer with the chat template's special tokens built in."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from alignkit.errors import ConfigError
from alignkit.tokenizer.gguf_vocab import LLAMA3_SPLIT, split_pre_tokenizer
from alignkit.tokenizer.templates import TEMPLATE_SPECIAL_TOKENS, get_template
from alignkit.tokenizer.tokenizer import Tokenizer

BYTE_ALPHABET_SIZE = 256


def train_bpe(
    texts: Iterable[str],
    *,
    vocab_size: int,
    special_tokens: list[str] | None = None,
    template: str = "chatml",
) -> Tokenizer:
    """Byte-level BPE trained on `texts`, with `template`'s control tokens ("chatml" or "llama3") as special tokens.

    The initial alphabet is all 256 byte symbols, so every string encodes and `decode(encode(x)) == x`. Special
    tokens take the first ids, then the 256 bytes, then learned merges; `vocab_size` counts all of them (a small
    corpus may stop short of it). The pre-tokenizer is GPT-2's for ChatML and Llama 3's regex for "llama3", so a
    "llama3" tokenizer splits text as Meta's does. EOS is the end-of-turn token (generation stops there) and PAD the
    end-of-document token.
    """
    get_template(template)  # validates the name
    spec = TEMPLATE_SPECIAL_TOKENS[template]
    specials = list(spec["tokens"]) + [t for t in (special_tokens or []) if t not in spec["tokens"]]
    minimum = BYTE_ALPHABET_SIZE + len(specials)
    if vocab_size < minimum:
        raise ConfigError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs the 256 byte symbols plus {len(specials)} "
            f"special tokens, so at least {minimum}."
        )
    backend = BackendTokenizer(models.BPE(ignore_merges=template == "llama3"))
    if template == "llama3":
        backend.pre_tokenizer = split_pre_tokenizer(LLAMA3_SPLIT)
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(
        backend,
        bos_token=spec["bos_token"],
        eos_token=spec["eos_token"],
        pad_token=spec["pad_token"],
        chat_template=get_template(template),
        add_bos_token=spec["bos_token"] is not None,
    )
