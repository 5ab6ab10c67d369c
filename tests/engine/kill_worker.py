"""Worker for the kill trials: `python -m tests.engine.kill_worker RUN_DIR [--phase P] [--resume]`.

Trains the tiny model for 6 steps with a checkpoint every 2 (keeping 2), and with --phase dies (os._exit, no
cleanup, like a SIGKILL) at that phase of the step-4 save (step 6 for during_prune, the first save that prunes):
  before_shards   before any shard file is written
  during_shards   after the tensor files, before DCP's .metadata
  after_shards    after every shard, before state.json
  before_rename   with the folder complete, before it is renamed into place
  after_rename    right after the rename
  during_prune    while the oldest checkpoint is being deleted
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import alignkit.engine.checkpoint as ckpt
import alignkit.engine.loop as loop
from tests.engine.helpers import run

PHASES = ("before_shards", "during_shards", "after_shards", "before_rename", "after_rename", "during_prune")


def arm(phase: str) -> None:
    die_at = 6 if phase == "during_prune" else 4
    saving = {"step": 0, "renamed": False}
    original_save, original_finish = loop.save_checkpoint, dcp.FileSystemWriter.finish
    original_dcp_save, original_write_state = dcp.save, ckpt._write_state
    original_replace, original_rmtree = os.replace, shutil.rmtree

    def die_if(name: str) -> None:
        if phase == name and saving["step"] == die_at:
            os._exit(9)

    def save_checkpoint(run_dir: Any, step: int, **kwargs: Any) -> Any:
        saving["step"] = step
        return original_save(run_dir, step, **kwargs)

    def dcp_save(*args: Any, **kwargs: Any) -> Any:
        die_if("before_shards")
        return original_dcp_save(*args, **kwargs)

    def finish(self: Any, *args: Any, **kwargs: Any) -> Any:
        die_if("during_shards")
        return original_finish(self, *args, **kwargs)

    def write_state(*args: Any) -> None:
        die_if("after_shards")
        original_write_state(*args)

    def replace(src: Any, dst: Any) -> None:
        die_if("before_rename")
        original_replace(src, dst)
        saving["renamed"] = True
        die_if("after_rename")

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if saving["renamed"]:
            die_if("during_prune")
        original_rmtree(path, *args, **kwargs)

    loop.save_checkpoint = save_checkpoint  # type: ignore[assignment]
    dcp.save = dcp_save  # type: ignore[assignment]
    dcp.FileSystemWriter.finish = finish  # type: ignore[method-assign]
    ckpt._write_state = write_state  # type: ignore[assignment]
    ckpt.os.replace = replace  # type: ignore[assignment]
    ckpt.shutil.rmtree = rmtree  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--phase", choices=PHASES)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.phase:
        arm(args.phase)
    run(Path(args.run_dir), total_steps=6, micro_batch_size=4, save_every=2, keep_last=2, resume=args.resume,
        model_seed=0 if not args.resume else 123)


if __name__ == "__main__":
    main()
