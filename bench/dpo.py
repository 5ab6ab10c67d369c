"""DPO throughput: alignkit vs TRL's DPOTrainer on SmolLM2-135M-Instruct, HH-RLHF helpful pairs, same settings.

Both sides fully fine-tune the same checkpoint (the GGUF converted once with `alignkit convert`) with the sigmoid
DPO loss (beta 0.1) on the same helpful-base pairs rendered with the model's chat template, max length 256 (the
prompt's start is cut first), the same batch of pairs, AdamW lr 1e-6, grad clipping at 1.0, the same precision,
and reference log-probs precomputed before training on both sides (alignkit: `reference.precompute`, TRL:
`precompute_ref_log_probs`), so the timed steps are policy forward + backward only. Each side runs in its own
subprocess, so peak RSS is that side's alone (it includes the precompute).

Reported per side: pairs/s and response tokens/s over the steps after `--warmup` untimed ones, peak RSS, final loss;
and the alignkit / TRL ratios.

    python bench/dpo.py --quick                      # 4 steps of 2 pairs each: a smoke run
    python bench/dpo.py --steps 20 --batch-size 4    # the full comparison (bf16)
    python bench/dpo.py --steps 20 --precision fp32
    python bench/dpo.py --device cuda --hf-dir DIR --steps 30 --batch-size 8 --records 400 --checkpointing off
"""
from __future__ import annotations

import argparse
from typing import Any

import harness
from harness import (
    import_trl,
    pair_throughput,
    peak_memory,
    print_pair_results,
    shared_data,
    trl_step_timer,
    write_first_jsonl_records,
)

# ---------------------------------------------------------------------------------------------- alignkit side


def run_alignkit(args: argparse.Namespace) -> dict[str, Any]:
    from alignkit.config import config_from_dict
    from alignkit.trainers import run
    from alignkit.trainers.preference_configs import DPOConfig

    cfg = config_from_dict(DPOConfig, {
        "model": {"path": args.model_dir, "gradient_checkpointing": harness.alignkit_checkpointing(args)},
        "data": {"train": args.data, "max_length": args.max_length, "packing": harness.packing(args), "truncation": "left", "eval_size": 0,
                 "eval_fraction": 0.0},
        "optim": {"lr": 1e-6, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant", "max_grad_norm": 1.0},
        "dpo": {"loss": ["sigmoid"], "beta": 0.1},
        "reference": {"precompute": True},
        "train": {"batch_size": args.batch_size, "micro_batch_size": args.batch_size, "max_steps": args.steps,
                  "precision": args.precision, "log_every": 1, "report_to": [], "output_dir": args.work_dir,
                  "device": args.device},
    })
    rows = [r for r in run("dpo", cfg).metrics if r.get("step", 0) >= 1]
    stats = pair_throughput([r["elapsed_s"] for r in rows], args.batch_size, args.warmup)
    return {**stats, **harness.engine_mfu(rows, args.warmup), **peak_memory(args.device), "final_loss": rows[-1]["loss"]}


# ---------------------------------------------------------------------------------------------- TRL side


def trl_records(path: str) -> list[dict[str, Any]]:
    """The same pairs in TRL's conversational format: {prompt, chosen, rejected} message lists."""
    from alignkit.data import load_records, preference_to_pair

    rows = []
    for i, record in enumerate(load_records(path)):
        pair = preference_to_pair(record, index=i)
        if not isinstance(pair, str) and pair.chosen != pair.rejected:
            rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
    return rows


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    datasets, trl = import_trl()

    dataset = datasets.Dataset.from_list(trl_records(args.data))
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config = trl.DPOConfig(
        output_dir=args.work_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_length=args.max_length, truncation_mode="keep_end", beta=0.1, loss_type=["sigmoid"],
        precompute_ref_log_probs=True, precompute_ref_batch_size=args.batch_size, learning_rate=1e-6,
        weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch",
        max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[], bf16=args.precision == "bf16",
        use_cpu=args.device == "cpu", gradient_checkpointing=harness.other_checkpointing(args), dataloader_num_workers=0, seed=0,
    )
    times: list[float] = []
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[trl_step_timer(times)])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    stats = pair_throughput(times, args.batch_size, args.warmup)
    return {**stats, **peak_memory(args.device), "final_loss": losses[-1] if losses else None}


# ---------------------------------------------------------------------------------------------- driver


def main() -> None:
    ran = harness.main(__file__, __doc__ or "", {"alignkit": run_alignkit, "trl": run_trl},
                       source=shared_data() / "hh-rlhf" / "helpful-base" / "test.jsonl.gz",
                       write_data=write_first_jsonl_records, defaults={"steps": 20, "batch_size": 4, "records": 400},
                       quick_records=16, records_help="first N records of helpful-base")
    if ran is None:
        return
    args, results = ran
    print_pair_results(f"DPO (sigmoid) SmolLM2-135M-Instruct, full fine-tune, {args.device}, HH-RLHF helpful-base, max length "
                       f"{args.max_length}, batch {args.batch_size} pairs, {args.precision}, checkpointing {args.checkpointing}, precomputed reference, "
                       f"{args.steps} steps ({args.warmup} untimed)", results, args.device)
    harness.exit_status(args)


if __name__ == "__main__":
    main()
