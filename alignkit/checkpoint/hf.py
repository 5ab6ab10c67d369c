"""Hugging Face checkpoints: `config.json` plus `model.safetensors` (or shards listed in an index), both ways.

Loading builds the model on the `meta` device and assigns the stored tensors directly, so a large model is never
random-initialised first. Every tensor is checked against the shape the config implies. Policy on tensors the
model does not have: an error, because an extra tensor almost always means `config.json` does not describe the
weights (a bias the config turned off, a head of another kind) and silently dropping it would change the model's
outputs. Two kinds are ignored on purpose: rotary `inv_freq` buffers that old checkpoints stored (alignkit
recomputes them from the config), and `lm_head.weight` in a checkpoint with tied embeddings (older `transformers`
versions wrote it; the tie decides, as in `transformers`).

Saving writes what `transformers.AutoModelForCausalLM` / `AutoModelForSequenceClassification` load: `config.json`,
`generation_config.json`, weights (sharded above `max_shard_bytes`), and the tokenizer when one is given. It writes
into a temporary sibling directory first and renames it into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from alignkit.checkpoint.files import save_safetensors
from alignkit.errors import CheckpointError, ConfigError
from alignkit.model.config import CAUSAL_LM_ARCHITECTURES, SCORE_ARCHITECTURES, ModelConfig
from alignkit.model.llama import LlamaForCausalLM, LlamaForScore, LlamaModel

if TYPE_CHECKING:
    from alignkit.tokenizer import Tokenizer

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

ModelKind = Literal["causal_lm", "score"]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _is_ignored(name: str) -> bool:
    # Rotary frequencies are a function of the config; checkpoints from before transformers 4.31 stored them.
    return name.endswith("rotary_emb.inv_freq")


def read_hf_config(directory: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """`(ModelConfig, raw config.json dict)` for an HF model directory, with CheckpointErrors that name the path."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such directory; pass an HF model directory that holds config.json.")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: expected an HF model directory (with config.json), got a file.")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory}: no {CONFIG_NAME} in this directory; it is not an HF model directory "
            "(save one with `alignkit convert` or transformers' save_pretrained)."
        )
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e}); re-download or re-export the model.") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(raw).__name__}.")
    try:
        config = ModelConfig.from_hf(raw, source=str(config_path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    return config, raw


def checkpoint_kind(raw_config: dict[str, Any]) -> ModelKind:
    """"score" for `...ForSequenceClassification` configs, else "causal_lm"."""
    archs = raw_config.get("architectures") or []
    return "score" if archs and archs[0] in SCORE_ARCHITECTURES else "causal_lm"


def tensor_files(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Where each stored tensor lives: name -> safetensors file, from the index or the single weights file."""
    directory = Path(directory)
    single, index_path = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return {name: single for name in _safetensors_keys(single)}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index_path}: not a valid safetensors index (expected a JSON object with a 'weight_map'); "
                "re-download the model."
            ) from e
        files = {name: directory / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(
                    f"{index_path} lists shard {shard.name}, which is missing from {directory}; "
                    "re-download the model (an interrupted download leaves some shards out)."
                )
        return files
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory}: has pickled PyTorch weights (*.bin / *.pt) but no {WEIGHTS_NAME} or {INDEX_NAME}; "
            "alignkit only reads safetensors (pickle files can run code). Convert with transformers: "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out)`."
        )
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}; the model weights are missing.")


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot read this safetensors file ({e}); it is truncated or corrupt. Re-download or re-export it."
    )


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise _corrupt(path, e) from e


def safetensors_shapes(directory: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of every stored tensor, read from the file headers only (no tensor data)."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, path in tensor_files(directory).items():
        by_file[path].append(name)
    shapes: dict[str, tuple[int, ...]] = {}
    for path, names in by_file.items():
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in names:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:
            raise _corrupt(path, e) from e
    return shapes


def expected_parameter_count(config: ModelConfig, kind: ModelKind) -> int:
    """Exact parameter count of the model `kind` builds from `config` (a score head replaces the LM head)."""
    total = config.num_parameters()
    if kind == "score":
        lm_head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
        total += config.hidden_size - lm_head
    return total


def _build_on_meta(config: ModelConfig, kind: ModelKind) -> LlamaForCausalLM | LlamaForScore:
    with torch.device("meta"):
        return LlamaForScore(config) if kind == "score" else LlamaForCausalLM(config)


def _no_score_head(directory: Path) -> CheckpointError:
    return CheckpointError(
        f"{directory}: the checkpoint has no score head (no 'score.weight' tensor), so it cannot be loaded as a "
        "reward / value model. Train one from it with `alignkit train rm`, or load it with kind='causal_lm'."
    )


def load_hf_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    kind: ModelKind = "causal_lm",
) -> LlamaForCausalLM | LlamaForScore:
    """Load an HF Llama-family directory as `LlamaForCausalLM` (kind="causal_lm") or `LlamaForScore` ("score").

    `dtype=None` keeps each tensor's stored dtype. The model is returned in eval mode.
    """
    if kind not in ("causal_lm", "score"):
        raise ValueError(f"kind must be 'causal_lm' or 'score', got {kind!r}")
    directory = Path(path)
    config, raw = read_hf_config(directory)
    stored_kind = checkpoint_kind(raw)
    if kind == "causal_lm" and stored_kind == "score":
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: architecture {raw['architectures'][0]} is a reward / score model with no "
            "LM head; load it with kind='score'."
        )
    files = tensor_files(directory)
    if kind == "score" and "score.weight" not in files:
        raise _no_score_head(directory)

    model = _build_on_meta(config, kind)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # the tie re-creates it below
    searched = ", ".join(sorted({p.name for p in files.values()})) or "(no files)"
    missing = [name for name in expected if name not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = ""
        if missing == ["lm_head.weight"]:
            hint = " If the model ties its LM head to the embeddings, set tie_word_embeddings: true in config.json."
        raise CheckpointError(
            f"{directory}: tensor {missing[0]!r}{more} is missing; searched {searched}. The weights do not match "
            f"config.json.{hint}"
        )
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    extra = [n for n in files if n not in expected and n not in ignorable and not _is_ignored(n)]
    if extra:
        if kind == "causal_lm" and extra == ["score.weight"]:
            raise CheckpointError(
                f"{directory}: has a 'score.weight' head (a reward / score model); load it with kind='score'."
            )
        more = f" (and {len(extra) - 1} more: {', '.join(extra[1:4])}...)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"{files[extra[0]]}: unexpected tensor {extra[0]!r}{more}; the model that config.json describes has no "
            "such parameter, so config.json does not match the weights (check attention_bias / mlp_bias / "
            "tie_word_embeddings and the architecture)."
        )

    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in expected:
        by_file[files[name]].append(name)
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                available = set(f.keys())
                for name in names:
                    if name not in available:
                        raise CheckpointError(
                            f"{file}: tensor {name!r} is missing from this shard although {INDEX_NAME} lists it "
                            "there; re-download the model."
                        )
                    tensor = f.get_tensor(name)
                    want = tuple(expected[name].shape)
                    if tuple(tensor.shape) != want:
                        raise CheckpointError(
                            f"{file}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(want)} from "
                            "config.json; the weights do not match the config."
                        )
                    if dtype is not None:
                        tensor = tensor.to(dtype)
                    state[name] = tensor.to(device)
        except (SafetensorError, OSError) as e:
            raise _corrupt(file, e) from e

    model.load_state_dict(state, strict=False, assign=True)
    _finish(model, device)
    return model


def _finish(model: LlamaForCausalLM | LlamaForScore, device: torch.device | str) -> None:
    """After assigning real tensors to a meta-built model: re-tie, recompute rotary frequencies, eval mode."""
    if isinstance(model, LlamaForCausalLM):
        model.tie_weights()
    # Built under the meta device, the rotary table is meta too; it is a pure function of the config.
    model.model._inv_freq = LlamaModel._rope_inv_freq(model.config).to(device)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    assert not still_meta, f"parameters left on the meta device: {still_meta}"
    model.eval()


def assign_state(
    model: LlamaForCausalLM | LlamaForScore, state: dict[str, torch.Tensor], device: torch.device | str
) -> None:
    """Assign a complete state dict to a meta-built model (used by the GGUF importer)."""
    model.load_state_dict(state, strict=False, assign=True)
    _finish(model, device)


# ---------------------------------------------------------------------------------------------------- saving


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _tensors_to_save(model: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    config: ModelConfig = model.config  # type: ignore[assignment]
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # HF omits the tied head and re-ties on load
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[tuple[str, int]] = set()
    for name, tensor in state.items():
        t = tensor.detach()
        if dtype is not None:
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        key = (str(t.device), t.untyped_storage().data_ptr())
        # safetensors refuses tensors that share memory; copy the second and later users of a storage.
        if key in seen_storage or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen_storage.add((str(t.device), t.untyped_storage().data_ptr()))
        out[name] = t
    return out


def _shard(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy shards in state-dict order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _generation_config(config: ModelConfig, tokenizer: Tokenizer | None) -> dict[str, Any]:
    bos = config.bos_token_id if config.bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    eos: int | list[int] | None = config.eos_token_id
    if eos is None and tokenizer is not None:
        # Chat models end a turn with <|eot_id|> / <|im_end|>; listing those makes HF `generate` stop there too.
        stops = list(tokenizer.stop_token_ids)
        eos = stops if len(stops) > 1 else (stops[0] if stops else tokenizer.eos_token_id)
    gen: dict[str, Any] = {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos}
    if config.pad_token_id is not None:
        gen["pad_token_id"] = config.pad_token_id
    return gen


def save_hf_model(
    model: LlamaForCausalLM | LlamaForScore,
    directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer: Tokenizer | None = None,
) -> list[Path]:
    """Write `model` (and `tokenizer`) as an HF directory that `transformers` loads; return the files written.

    `dtype=None` keeps the parameters' dtype. Replaces `directory` atomically if it already holds a model
    (a `config.json`); refuses to replace any other non-empty directory.
    """
    target = Path(directory)
    if target.exists():
        if not target.is_dir():
            raise CheckpointError(f"{target}: exists and is a file; choose a directory path to save the model to.")
        if any(target.iterdir()) and not (target / CONFIG_NAME).is_file():
            raise CheckpointError(
                f"{target}: exists, is not empty and is not a model directory (no {CONFIG_NAME}); refusing to "
                "replace it. Choose a new or empty directory."
            )
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    config = model.config
    tensors = _tensors_to_save(model, dtype)
    saved_dtype = next(iter(tensors.values())).dtype
    if isinstance(model, LlamaForScore):
        arch = {v: k for k, v in SCORE_ARCHITECTURES.items()}[config.model_type]
        hf_config = config.to_hf(architecture=arch, dtype=_DTYPE_NAMES.get(saved_dtype, "float32"))
        hf_config["num_labels"] = 1
        hf_config["id2label"] = {"0": "LABEL_0"}
        hf_config["label2id"] = {"LABEL_0": 0}
    else:
        arch = {v: k for k, v in CAUSAL_LM_ARCHITECTURES.items()}[config.model_type]
        hf_config = config.to_hf(architecture=arch, dtype=_DTYPE_NAMES.get(saved_dtype, "float32"))

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_json(tmp / CONFIG_NAME, hf_config)
        _write_json(tmp / GENERATION_CONFIG_NAME, _generation_config(config, tokenizer))
        shards = _shard(tensors, max_shard_bytes)
        metadata = {"format": "pt"}  # transformers checks this key
        if len(shards) == 1:
            save_safetensors(shards[0], tmp / WEIGHTS_NAME, metadata=metadata)
        else:
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors(shard, tmp / name, metadata=metadata)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        if tokenizer is not None:
            tokenizer.save(tmp)
        _fsync_tree(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(target / p.name for p in target.iterdir())


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`. POSIX cannot rename over a non-empty directory, so the old one is moved aside
    first; at every moment `target` is either the complete old model, absent, or the complete new one."""
    old: Path | None = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(new, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def describe_files(files: Iterable[Path]) -> list[str]:
    """Human-readable `name (size)` list for CLI output."""
    out = []
    for p in files:
        size = p.stat().st_size
        out.append(f"{p.name} ({_human_bytes(size)})")
    return out


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
