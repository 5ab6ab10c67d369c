"""Worker for the torchrun tests: `python -m torch.distributed.run ... -m tests.engine.dist_worker RUN_DIR ...`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from alignkit.engine import (
    DistInfo,
    Engine,
    Trainable,
    close_distributed,
    init_distributed,
    maximum,
    minimum,
    total,
)
from alignkit.engine import distributed as dist
from alignkit.engine.config import OptimSection, TrainSection
from tests.engine.helpers import examples, lm_loss, step_batches, tiny_model


class OneRankGroup(DistInfo):
    """A process group of one that still wraps the model (DistInfo.enabled is False for one process), so a single
    GPU runs the same NCCL collectives and DDP / FSDP2 wrappers as a multi-GPU job."""

    @property
    def enabled(self) -> bool:
        return True


def join_one_rank_group(device: str) -> DistInfo:
    if device == "cuda":
        torch.cuda.set_device(0)
    torch.distributed.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    return OneRankGroup(device=dev)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--kill-at", type=int, default=0, help="exit hard when asked for this (1-based) step")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--group", action="store_true",
                        help="with one process, still join a process group and wrap the model (see OneRankGroup)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = join_one_rank_group(args.device) if args.group else init_distributed(args.device)
    cfg = TrainSection(batch_size=8, micro_batch_size=args.micro, save_every=args.save_every, report_to=[],
                       resume=args.resume, strategy=args.strategy, device=args.device, peak_flops=1e12)
    model = tiny_model(0 if not args.resume else 99).to(info.device)
    optim = OptimSection(lr=1e-2, warmup_steps=2, weight_decay=0.1)
    engine = Engine({"model": Trainable(model, optim)}, cfg, run_dir=Path(args.run_dir), total_steps=args.steps,
                    dist_info=info, stream=open(os.devnull, "w"))  # noqa: SIM115
    batches = step_batches(examples(), cfg, info=info)
    if args.kill_at:
        original = batches.__class__.__iter__

        def dying(self):  # type: ignore[no-untyped-def]
            for micro in original(self):
                if self.step == args.kill_at:
                    os._exit(3)  # no cleanup, like a killed process
                yield micro

        batches.__class__.__iter__ = dying  # type: ignore[method-assign]

    def loss_on_device(models: Any, batch: Any, num_tokens: int) -> Any:
        loss, metrics = lm_loss(models, batch.to(info.device), num_tokens)
        # Reductions across ranks: the largest and smallest rank, and the micro-batches of the whole step.
        return loss, {**metrics, "rank_max": maximum(info.rank), "rank_min": minimum(info.rank),
                      "micro_batches": total(1)}

    engine.train(batches, loss_on_device)
    if dist.is_initialized():
        close_distributed()


if __name__ == "__main__":
    main()
