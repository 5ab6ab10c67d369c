"""Worker for the torchrun tests: `python -m torch.distributed.run ... -m tests.engine.dist_worker RUN_DIR ...`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from alignkit.engine import Engine, close_distributed, init_distributed
from alignkit.trainers.configs import OptimSection, TrainSection
from tests.engine.helpers import examples, lm_loss, step_batches, tiny_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--kill-at", type=int, default=0, help="exit hard when asked for this (1-based) step")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    cfg = TrainSection(batch_size=8, micro_batch_size=args.micro, save_every=args.save_every, report_to=[],
                       resume=args.resume)
    model = tiny_model(0 if not args.resume else 99)
    engine = Engine(model, cfg, OptimSection(lr=1e-2, warmup_steps=2, weight_decay=0.1), run_dir=Path(args.run_dir),
                    total_steps=args.steps, dist_info=info, stream=open(os.devnull, "w"))  # noqa: SIM115
    batches = step_batches(examples(), cfg, info=info)
    if args.kill_at:
        original = batches.__class__.__iter__

        def dying(self):  # type: ignore[no-untyped-def]
            for micro in original(self):
                if self.step == args.kill_at:
                    os._exit(3)  # no cleanup, like a killed process
                yield micro

        batches.__class__.__iter__ = dying  # type: ignore[method-assign]
    engine.train(batches, lm_loss)
    close_distributed()


if __name__ == "__main__":
    main()
