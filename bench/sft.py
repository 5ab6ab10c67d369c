"""SFT throughput: alignkit vs TRL's SFTTrainer on SmolLM2-135M-Instruct, same data and settings.

Both sides fine-tune every weight of the same checkpoint (the GGUF converted once with `alignkit convert`) on the
same Alpaca records rendered with the model's chat template, with the loss on the assistant's answer only:
sequence length 256 (longer records cut), right padding to the longest sequence of each batch (no packing),
the same batch size, AdamW lr 1e-5, grad clipping at 1.0, and the same precision. Each side runs in its own
subprocess, so peak RSS is that side's alone.

Reported per side: target tokens/s (tokens that carry loss), total tokens/s (every non-padding token processed),
peak RSS, measured over the steps after `--warmup` untimed ones; and the alignkit / TRL ratios.

    python bench/sft.py --quick                   # 4 steps each, a smoke run
    python bench/sft.py --steps 30 --batch-size 8 # the full comparison
    python bench/sft.py --device cuda --hf-dir DIR --steps 30 --batch-size 16 --records 800 --checkpointing off
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import harness
from harness import (
    import_trl,
    memory_cells,
    memory_header,
    memory_ratios,
    peak_memory,
    shared_data,
    timed_span,
    trl_step_timer,
)

# ---------------------------------------------------------------------------------------------- timing


def throughput(step_times: list[float], targets: list[int], totals: list[int], warmup: int) -> dict[str, float]:
    """Target and total tokens per second over the timed steps."""
    seconds, steps = timed_span(step_times, warmup)
    return {
        "seconds": seconds,
        "timed_steps": steps,
        "target_tokens_per_s": sum(targets[warmup:]) / seconds,
        "total_tokens_per_s": sum(totals[warmup:]) / seconds,
    }


# ---------------------------------------------------------------------------------------------- alignkit side


def run_alignkit(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from alignkit.config import config_from_dict
    from alignkit.engine import StepBatches
    from alignkit.trainers import run
    from alignkit.trainers.configs import SFTConfig
    from alignkit.trainers.language import batching, load_examples

    cfg = config_from_dict(SFTConfig, {
        "model": {"path": args.model_dir, "gradient_checkpointing": harness.alignkit_checkpointing(args)},
        "data": {"train": args.data, "format": "instruction", "max_length": args.max_length, "eval_size": 0,
                 "eval_fraction": 0.0, "packing": False},
        "optim": {"lr": 1e-5, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant", "max_grad_norm": 1.0},
        "train": {"batch_size": args.batch_size, "micro_batch_size": args.batch_size, "max_steps": args.steps,
                  "precision": args.precision, "log_every": 1, "report_to": [], "output_dir": args.work_dir,
                  "save_every": 0, "device": args.device},
    })
    result = run("sft", cfg)
    rows = [r for r in result.metrics if r.get("step", 0) >= 1]
    # Total (non-padding) tokens per step: replay the same deterministic batches.
    from alignkit.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(args.model_dir)
    examples, _ = load_examples(cfg.data, tokenizer)
    items, collate = batching(examples, cfg.data, tokenizer)
    batches = StepBatches(items, collate=collate, batch_size=args.batch_size, micro_batch_size=args.batch_size,
                          seed=cfg.train.seed)
    totals = []
    for _, micro in zip(range(args.steps), batches):
        totals.append(int(sum(int(torch.as_tensor(mb.attention_mask).sum()) for mb in micro)))
    stats = throughput([r["elapsed_s"] for r in rows], [r["num_tokens"] for r in rows], totals, args.warmup)
    return {**stats, **harness.engine_mfu(rows, args.warmup), **peak_memory(args.device), "final_loss": rows[-1]["loss"]}


# ---------------------------------------------------------------------------------------------- TRL side


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    datasets, trl = import_trl()
    from alignkit.data.formats import instruction_to_messages

    records = json.loads(Path(args.data).read_text())
    rows = []
    for i, record in enumerate(records):
        messages = instruction_to_messages(record, index=i)
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    dataset = datasets.Dataset.from_list(rows)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config = trl.SFTConfig(
        output_dir=args.work_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_length=args.max_length, learning_rate=1e-5, weight_decay=0.0, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch", max_steps=args.steps, logging_steps=1,
        save_strategy="no", report_to=[], bf16=args.precision == "bf16", use_cpu=args.device == "cpu", packing=False,
        gradient_checkpointing=harness.other_checkpointing(args),
        completion_only_loss=True, dataloader_num_workers=0, seed=0,
    )
    counts: dict[str, list[int]] = {"targets": [], "totals": []}
    times: list[float] = []
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[trl_step_timer(times)])
    collator = trainer.data_collator

    def counting_collator(features: list[dict]) -> dict:
        batch = collator(features)
        counts["totals"].append(int(batch["attention_mask"].sum()))
        # TRL's labels are unshifted: position 0 is never predicted, the model shifts internally.
        counts["targets"].append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    stats = throughput(times, counts["targets"][: len(times)], counts["totals"][: len(times)], args.warmup)
    return {**stats, **peak_memory(args.device), "final_loss": losses[-1] if losses else None}


# ---------------------------------------------------------------------------------------------- driver


def write_first_json_records(source: Path, out: Path, count: int) -> None:
    out.write_text(json.dumps(json.loads(source.read_text())[:count]))


def main() -> None:
    ran = harness.main(__file__, __doc__ or "", {"alignkit": run_alignkit, "trl": run_trl},
                       source=shared_data() / "alpaca" / "alpaca_train_2k.json", write_data=write_first_json_records,
                       defaults={"steps": 30, "batch_size": 8, "records": 2000}, quick_records=64,
                       records_help="first N records of the Alpaca 2k file")
    if ran is None:
        return
    args, results = ran
    device = args.device
    print(f"\nSFT SmolLM2-135M-Instruct, full fine-tune, {device}, seq {args.max_length}, batch {args.batch_size}, "
          f"{args.precision}, checkpointing {args.checkpointing}, AdamW lr 1e-5, {args.steps} steps ({args.warmup} untimed)")
    print(f"{'':10s} {'target tok/s':>13s} {'total tok/s':>12s} {'MFU %':>6s} {memory_header(device)} {'final loss':>11s}")
    for side, r in results.items():
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        print(f"{side:10s} {r['target_tokens_per_s']:13.1f} {r['total_tokens_per_s']:12.1f} {harness.mfu_cell(r)} "
              f"{memory_cells(r, device)} {loss:>11s}")
    if "alignkit" in results and "trl" in results:
        a, t = results["alignkit"], results["trl"]
        print(f"ratio alignkit/TRL: target tokens/s {a['target_tokens_per_s'] / t['target_tokens_per_s']:.2f}x, "
              f"total tokens/s {a['total_tokens_per_s'] / t['total_tokens_per_s']:.2f}x, {memory_ratios(a, t, device)}")
    print("target tokens = tokens that carry loss (assistant answers); total = all non-padding tokens processed.")
    print("MFU: alignkit's logged model FLOPs utilisation (docs/training.md); TRL does not report one.")
    harness.exit_status(args)


if __name__ == "__main__":
    main()
