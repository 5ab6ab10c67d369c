"""alignkit: native-PyTorch LLM training and alignment, from pretraining to RLHF."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from alignkit.model import LlamaForCausalLM
    from alignkit.tokenizer import Tokenizer


def load(path: str, **kwargs: Any) -> tuple[LlamaForCausalLM, Tokenizer | None]:
    """`model, tokenizer = alignkit.load(path)`: an HF directory, a `.gguf` file, or an alignkit run directory.

    The tokenizer is None when the checkpoint carries none (an HF folder without `tokenizer.json`).
    Keyword arguments go to `alignkit.checkpoint.load_pretrained` (`dtype`, `device`, `kind`).
    """
    from alignkit.checkpoint import load_pretrained

    return load_pretrained(path, **kwargs)
