"""Resumable training checkpoints through `torch.distributed.checkpoint` (DCP):
`run_dir/checkpoints/step_000100/{<name>/, state.json}` for each trainable model `<name>` of the engine (`model`
for the single-model stages).

- <name>/: the model's trainable parameters (all of them for full fine-tuning, the adapters for LoRA) and its
  AdamW state, as a DCP checkpoint: each rank writes its own shards (FSDP2) or rank 0 the replicated tensors
  (one process, DDP), keyed by parameter name, so a run resumes at any world size and with either strategy. Frozen
  weights, and frozen models such as a reference, come back from where the trainer loads them.
- state.json: the step, each optimizer's own step count, elapsed time, the state of every registered step source
  and trainer object (the data position, a KL controller, running statistics, a sampler's generator), the frozen
  models' sources, and every RNG state (python, numpy, torch CPU, CUDA) of every rank, so dropout and sampling
  continue exactly where they stopped. Tensors in those states are stored as base64.

Nothing here unpickles arbitrary code: DCP's `.metadata` file is a pickle, and it is read with an unpickler that
only builds DCP's own metadata classes (`SafeFileSystemReader`).

Each checkpoint is written into `checkpoints/.tmp-step_000100` and renamed into place with one `os.replace` once
every rank has written its shards and rank 0 has written state.json, so a process killed at any point of a save
leaves a `.tmp-` folder that is ignored (and deleted on resume), and the previous checkpoint stays the latest.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alignkit.errors import CheckpointError, ConfigError

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


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


def _trainable_names(model: nn.Module) -> set[str]:
    # named_parameters lists a tied weight once (under the embedding's name); its twin follows it on load.
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """What DCP saves or loads in place for one model: its trainable tensors and, once it has any, its AdamW state
    (an optimizer that has not stepped has none, and reading it would make one up with a fake step)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    trainable = _trainable_names(model)
    state: dict[str, Any] = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in trainable}}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    state: dict[str, Any],
    keep_last: int = 2,
    is_main: bool = True,
) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last` complete ones.

    Collective under torch.distributed: every rank calls it with its own shards; rank 0 (`is_main`) writes
    state.json and renames the folder into place after every rank has written.
    """
    import torch.distributed.checkpoint as dcp

    from alignkit.engine import distributed as dist

    root = Path(run_dir) / CHECKPOINTS
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    for name, model in models.items():
        optimizer = optimizers[name] if optimizers[name].state else None
        with _single_process_quiet():
            dcp.save(_dcp_state(model, optimizer), storage_writer=dcp.FileSystemWriter(str(tmp / name)),
                     no_dist=not dist.is_initialized())
    dist.barrier()
    if is_main:
        _write_state(tmp / "state.json", {"step": step, **state})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
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


def refuse_restart(run_dir: str | Path) -> None:
    """A ConfigError when `run_dir` holds checkpoints and the run was not asked to resume them."""
    if list_checkpoints(run_dir):
        raise ConfigError(
            f"{run_dir} already holds checkpoints from an earlier run; pass --resume (train.resume=true) to continue "
            "it, or choose another train.output_dir."
        )


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
    """Load trainable model `name`'s tensors (and optimizer state, when it has any) from a checkpoint folder into
    `model`, resharded for this run's world size and strategy (collective under torch.distributed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from alignkit.engine import distributed as dist

    folder = Path(path) / name
    reader = SafeFileSystemReader(str(folder))
    try:
        stored = reader.read_metadata().state_dict_metadata
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"Checkpoint {folder} cannot be read ({e}); delete {path} to resume from an older "
                              "checkpoint.") from None
    has_optimizer = any(key.startswith("optim.") for key in stored)
    state = _dcp_state(model, optimizer if has_optimizer else None)
    saved = {key[len("model."):]: meta for key, meta in stored.items() if key.startswith("model.")}
    missing, unexpected = sorted(set(state["model"]) - set(saved)), sorted(set(saved) - set(state["model"]))
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {folder} does not match model {name!r} being trained (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); resume with the same model and lora settings."
        )
    for key, tensor in state["model"].items():
        if tuple(saved[key].size) != tuple(tensor.shape):
            raise CheckpointError(
                f"Checkpoint {folder}: tensor {key} has shape {tuple(saved[key].size)}, model {name!r} expects "
                f"{tuple(tensor.shape)}; resume with the same model config."
            )
    with _single_process_quiet():
        dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None and has_optimizer:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def read_model_tensors(path: str | Path, name: str = "model") -> dict[str, torch.Tensor]:
    """The trainable tensors model `name` saved in a checkpoint folder, whole, on the CPU (no model needed)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(path) / name
    reader = SafeFileSystemReader(str(folder))
    stored = reader.read_metadata().state_dict_metadata
    tensors = {key[len("model."):]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
               for key, meta in stored.items() if key.startswith("model.")}
    with _single_process_quiet():
        dcp.load({"model": tensors}, storage_reader=reader, no_dist=True)
    return tensors


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP's metadata holds: its own dataclasses, torch.Size and dtypes, plain containers."""

    _BUILTINS = {"set", "frozenset", "slice", "bytearray", "complex", "object"}

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module.startswith("torch.distributed.checkpoint.")
            or (module == "torch" and (name == "Size" or isinstance(
                getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))))
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))
            or (module == "collections" and name == "OrderedDict")
            or (module == "builtins" and name in self._BUILTINS)
            or (module == "enum" and name == "Enum")
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")
        return super().find_class(module, name)


def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader


def SafeFileSystemReader(path: str) -> Any:  # noqa: N802 (a class built on first use: DCP imports are slow)
    """DCP's FileSystemReader with a metadata unpickler that cannot run arbitrary code."""
    return _safe_reader_class()(path)


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
