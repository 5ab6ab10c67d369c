"""Process groups under torchrun, rank helpers, model wrapping (DDP now, FSDP2 slots in), metric reductions.

Single-process runs never touch torch.distributed: every helper degrades to the identity when it is not
initialised, so trainers call them unconditionally.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(device: str = "auto") -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group: gloo on CPU, nccl on GPU."""
    base = pick_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=base if base.type == "cpu" else torch.device("cuda", 0))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30)
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def close_distributed() -> None:
    """Leave the process group together: a barrier, then destroy it. A rank that exits while another is still
    tearing down its gloo connections can abort the job at interpreter exit ("terminate called without an active
    exception"); the barrier makes every rank finish its last collective first."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce over ranks in place (`op`: sum, max, min); the identity on one process.

    Callers reduce small CPU tensors too (the step's token count, evaluation sums). NCCL only reduces CUDA
    tensors, so under NCCL a CPU tensor is reduced through a copy on this rank's GPU and written back.
    """
    if is_initialized():
        if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
            staged = tensor.cuda()
            dist.all_reduce(staged, op=_OPS[op])
            tensor.copy_(staged)
        else:
            dist.all_reduce(tensor, op=_OPS[op])
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; the identity on one process."""
    return all_reduce(tensor, "sum")


def all_gather_object(obj: object) -> list[object]:
    if not is_initialized():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """The module the training loop calls. One process: the model itself.

    ddp: replicated weights, gradients averaged by all-reduce during backward.
    fsdp2: `torch.distributed.fsdp.fully_shard` on each decoder layer then the root (parameters, gradients and
    optimizer state sharded across ranks). Trainers never see the difference: they call the wrapped module, and
    `unwrap` returns the plain model for saving.
    """
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # type: ignore[union-attr]
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"unknown strategy {strategy!r}; expected 'ddp' or 'fsdp2'")


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Inside the block, `model` holds its full parameters: under FSDP2 every sharded submodule is all-gathered
    once and kept whole across forwards (a decode loop would otherwise all-gather every layer at every token);
    on exit they are sharded again. Without FSDP2 (one process, DDP) it does nothing."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()
            module.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of `model` whole, on rank 0's CPU (an empty dict on the other ranks): FSDP2's shards gathered
    (collective), DDP's replicas as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
