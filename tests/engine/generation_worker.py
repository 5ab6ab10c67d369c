"""Worker for the FSDP2 generation test: `torchrun --nproc_per_node 2 -m tests.engine.generation_worker OUT`.

Shards the tiny model with FSDP2 inside an Engine, generates greedily through `engine.generation_model`, and writes
the tokens and whether the parameters were sharded again afterwards to OUT/rank<r>.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from alignkit.engine import Engine, Trainable, close_distributed, init_distributed
from alignkit.engine.config import OptimSection, TrainSection
from alignkit.generation import SamplingParams, generate
from tests.engine.helpers import tiny_model

PROMPTS = [[1, 5, 9, 13], [2, 4, 6]]


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    cfg = TrainSection(strategy="fsdp2", report_to=[], peak_flops=1e12, device="cpu")
    engine = Engine({"model": Trainable(tiny_model(0), OptimSection())}, cfg, run_dir=out / "run", total_steps=1,
                    dist_info=info, stream=open(os.devnull, "w"))  # noqa: SIM115
    module = engine.modules["model"]
    with engine.generation_model("model") as model:
        assert not model.training
        completions = generate(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=[]))
    sharded_again = all(type(p).__name__ == "DTensor" for p in module.parameters())
    (out / f"rank{info.rank}.json").write_text(json.dumps({
        "tokens": [c.token_ids for c in completions], "sharded_again": sharded_again, "training": module.training,
    }))
    close_distributed()


if __name__ == "__main__":
    main()
