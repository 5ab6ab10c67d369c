"""Resumable training checkpoints: `run_dir/checkpoints/step_000100/{<name>.safetensors, <name>.optimizer.pt,
state.json}` for each trainable model `<name>` of the engine (`model` for the single-model stages).

Each checkpoint is written into `checkpoints/.tmp-step_000100` and renamed into place with one `os.replace`, so a
process killed mid-write leaves a `.tmp-` folder that is ignored, and the previous checkpoint stays the latest.
`state.json` is written last; a directory without it is never treated as complete.

- <name>.safetensors: the model's trainable parameters (all of them for full fine-tuning, the adapters for LoRA;
  frozen weights, and frozen models such as a reference, come back from where the trainer loads them).
- <name>.optimizer.pt: `optimizer.state_dict()`, plain tensors and numbers, loaded with
  `torch.load(weights_only=True)`.
- state.json: the step, each optimizer's own step count, elapsed time, the state of every registered step source
  and trainer object (the data position, a KL controller, running statistics, a sampler's generator), the frozen
  models' sources, and every RNG state (python, numpy, torch CPU, CUDA) of every rank, so dropout and sampling
  continue exactly where they stopped. Tensors in those states are stored as base64 (never pickled).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignkit.errors import CheckpointError

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters lists a tied weight once, which safetensors requires (it refuses shared storage).
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def capture_rng() -> dict[str, Any]:
    """Every RNG state, JSON-serialisable."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last` complete ones (call on rank 0)."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, model in models.items():
        save_file(trainable_state(model), str(tmp / f"{name}.safetensors"))
        torch.save(optimizers[name].state_dict(), tmp / f"{name}.optimizer.pt")
    _write_state(tmp / "state.json", {"step": step, **state})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.write_text(json.dumps(state))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (a `step_N` folder with state.json), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Delete `.tmp-step_N` folders left by a process that died while saving."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def read_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state.json."""
    path = Path(path)
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Checkpoint {path} cannot be read ({e}); delete it to resume from an older one.") from None


def load_model_state(path: str | Path, name: str, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     device: torch.device) -> None:
    """Load trainable model `name`'s weights (and optimizer state) from a checkpoint folder into `model`."""
    path = Path(path)
    weights_path = path / f"{name}.safetensors"
    try:
        weights = load_file(str(weights_path), device=str(device))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Checkpoint {weights_path} cannot be read ({e}); delete {path} to resume from an "
                              "older checkpoint.") from None
    expected = trainable_state(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(dict(model.named_parameters())))
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {weights_path} does not match model {name!r} being trained "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same model and lora settings."
        )
    params = dict(model.named_parameters())
    for key, tensor in weights.items():
        if params[key].shape != tensor.shape:
            raise CheckpointError(
                f"Checkpoint {weights_path}: tensor {key} has shape {tuple(tensor.shape)}, model {name!r} "
                f"expects {tuple(params[key].shape)}; resume with the same model config."
            )
    with torch.no_grad():
        for key, tensor in weights.items():
            params[key].copy_(tensor)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / f"{name}.optimizer.pt", map_location=device, weights_only=True))


def encode_state(value: Any) -> Any:
    """A JSON-serialisable copy of a `state_dict()`: tensors (a generator's state, running sums) become base64."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        data = tensor.view(torch.uint8) if tensor.dtype != torch.bool else tensor.to(torch.uint8)
        return {"__tensor__": base64.b64encode(data.numpy().tobytes()).decode(), "dtype": str(tensor.dtype)[6:],
                "shape": list(tensor.shape)}
    if isinstance(value, dict):
        return {str(k): encode_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_state(v) for v in value]
    return value


def decode_state(value: Any) -> Any:
    """The inverse of `encode_state` (tuples come back as lists)."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            dtype = getattr(torch, value["dtype"])
            raw = torch.frombuffer(bytearray(base64.b64decode(value["__tensor__"])), dtype=torch.uint8)
            tensor = raw.to(torch.bool) if dtype == torch.bool else raw.view(dtype)
            return tensor.reshape(value["shape"]).clone()
        return {k: decode_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_state(v) for v in value]
    return value
