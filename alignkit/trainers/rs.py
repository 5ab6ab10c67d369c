"""Rejection sampling: rounds of sample n answers per prompt -> keep the best by a reward -> SFT on the kept ones.

Llama 3's post-training step (https://arxiv.org/abs/2407.21783, section 4.2.2), with a checker or a reward model
as the judge. Each round samples rollout.num_generations answers for its prompts from the current model, keeps what
rs.keep / rs.threshold allow (`alignkit.rollout.best_of`), writes them to round_<r>/samples.jsonl and kept.jsonl,
and runs an ordinary `alignkit train sft` on the kept answers (plus earlier rounds' under rs.accumulate) in
round_<r>/sft, starting from the previous round's model. docs/concepts/rejection_sampling.md has the details.

Resume works round by round: with train.resume, a finished round (round_<r>/round.json) is read back, a round whose
samples were written reuses them, and its SFT resumes from its own checkpoints.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

from alignkit.checkpoint import resolve_model_path
from alignkit.engine import distributed as dist
from alignkit.engine.logging import MetricsLogger
from alignkit.errors import ConfigError
from alignkit.rewards.verifiable import load_rewards
from alignkit.rollout.best_of import sample_and_select, sample_records, sample_summary, sft_records
from alignkit.rollout.cli import jsonl, write_atomic
from alignkit.rollout.prompts import PromptItem, load_prompts
from alignkit.tokenizer import Tokenizer, set_chat_template
from alignkit.trainers.common import RunResult, build_model, load_tokenizer, read_records, setup
from alignkit.trainers.configs import DataSection, SFTConfig
from alignkit.trainers.rl_configs import RSConfig
from alignkit.trainers.stage import prepare_run_dir

Config = RSConfig
logger = logging.getLogger(__name__)


def round_prompts(items: list[PromptItem], order: list[int], round_number: int, per_round: int | None
                  ) -> list[PromptItem]:
    """Round r's prompts: all of them, or the next `per_round` of the shuffled order (wrapping around)."""
    if per_round is None:
        return items
    start = (round_number - 1) * per_round
    return [items[order[(start + i) % len(order)]] for i in range(per_round)]


def sample_round(cfg: RSConfig, model_path: str, tokenizer: Tokenizer, items: list[PromptItem],
                 functions: list[Any], weights: list[float], seed: int, info: Any) -> list[Any]:
    """Every process samples its contiguous share of `items`; all processes get every sample back, in order."""
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.path = model_path
    model, tokenizer = build_model(model_cfg, tokenizer, device=info.device)
    per_rank = math.ceil(len(items) / info.world_size)
    first = info.rank * per_rank
    params = cfg.rollout.sampling_params(tokenizer, seed=seed + info.rank)
    mine = sample_and_select(model, tokenizer, items[first : first + per_rank], params,
                             n=cfg.rollout.num_generations, functions=functions, weights=weights, keep=cfg.rs.keep,
                             k=cfg.rs.k, threshold=cfg.rs.threshold, batch_size=cfg.rs.sample_batch_size,
                             first_index=first)
    del model
    if info.world_size == 1:
        return mine
    return [s for part in dist.all_gather_object(mine) for s in part]


def sft_config(cfg: RSConfig, model_path: str, data_file: Path, output_dir: Path, tokenizer: str | None) -> SFTConfig:
    """Round r's SFT: the stage's optim / train / lora / chat template, on the kept answers, from `model_path`."""
    model = copy.deepcopy(cfg.model)
    model.path = model_path
    train = copy.deepcopy(cfg.train)
    train.output_dir = str(output_dir)
    data = DataSection(train=str(data_file), format="chat", max_length=cfg.data.max_length,
                       truncation=cfg.data.truncation, packing=cfg.data.packing, eval_fraction=0.0, eval_size=0,
                       seed=cfg.data.seed)
    return SFTConfig(model=model, tokenizer=tokenizer, data=data, optim=copy.deepcopy(cfg.optim), train=train,
                     lora=copy.deepcopy(cfg.lora), chat_template=cfg.chat_template)


def train(cfg: RSConfig) -> RunResult:
    from alignkit.trainers import run

    if cfg.model.path is None:
        raise ConfigError("rejection sampling starts from a trained model; set model.path.")
    info = setup(cfg.train)
    functions, weights = load_rewards(cfg.rs.reward_funcs, cfg.rs.reward_weights, device=info.device)
    run_dir = Path(cfg.train.output_dir)
    if not cfg.train.resume and (run_dir / "round_1").exists():
        raise ConfigError(f"{run_dir} already holds rejection-sampling rounds; pass --resume (train.resume=true) to "
                          "continue them, or choose another train.output_dir.")

    # The starting model's tokenizer (or the configured one) for every round: each round's SFT saves it unchanged.
    tokenizer = load_tokenizer(cfg.tokenizer or str(resolve_model_path(str(cfg.model.path))))
    set_chat_template(tokenizer, cfg.chat_template)
    source = cfg.data.single_source("rs")
    items = load_prompts(read_records(source, cfg.data), tokenizer, source=source,
                         max_prompt_length=cfg.rollout.max_prompt_length, system_prompt=cfg.rollout.system_prompt,
                         log=info.is_main)
    order = list(range(len(items)))
    random.Random(cfg.train.seed).shuffle(order)
    run_dir = prepare_run_dir(cfg, info)
    metrics = MetricsLogger(run_dir, total_steps=cfg.rs.rounds, report_to=cfg.train.report_to, enabled=info.is_main)
    if info.is_main and cfg.train.resume:
        metrics.truncate_after(0)  # finished rounds are logged again from their round.json

    model_path, tokenizer_spec = str(cfg.model.path), cfg.tokenizer
    kept_files: list[Path] = []
    rows: list[dict[str, Any]] = []
    for r in range(1, cfg.rs.rounds + 1):
        round_dir = run_dir / f"round_{r}"
        done = round_dir / "round.json"
        if cfg.train.resume and done.is_file():
            row = json.loads(done.read_text())
        else:
            row = _run_round(cfg, r, round_dir, model_path, tokenizer, tokenizer_spec,
                             round_prompts(items, order, r, cfg.rs.prompts_per_round), functions, weights, kept_files,
                             info, run)
        kept_files.append(round_dir / "kept.jsonl")
        model_path, tokenizer_spec = row.pop("model_dir"), None
        rows.append(row)
        if info.is_main:
            metrics.log(row)
        row["model_dir"] = model_path
    metrics.close()
    # run_dir/final links to the last round's model, where users and `alignkit generate --model run_dir` look.
    final = run_dir / "final"
    if info.is_main and (run_dir / "round_1").is_dir():
        if final.is_symlink():
            final.unlink()
        if Path(model_path).is_dir():
            final.symlink_to(os.path.relpath(Path(model_path).resolve(), run_dir.resolve()), target_is_directory=True)
    dist.barrier()
    return RunResult(run_dir=run_dir, final_model_dir=final if final.is_dir() else Path(model_path), metrics=rows)


def _run_round(cfg: RSConfig, r: int, round_dir: Path, model_path: str, tokenizer: Tokenizer,
               tokenizer_spec: str | None,
               items: list[PromptItem], functions: list[Any], weights: list[float], kept_files: list[Path],
               info: Any, run: Any) -> dict[str, Any]:
    """Sample (or reuse this round's samples), keep, fine-tune; the round's metrics row, with its model_dir."""
    started = time.perf_counter()
    samples_file, kept_file = round_dir / "samples.jsonl", round_dir / "kept.jsonl"
    if cfg.train.resume and samples_file.is_file() and (round_dir / "summary.json").is_file():
        summary = json.loads((round_dir / "summary.json").read_text())
    else:
        samples = sample_round(cfg, model_path, tokenizer, items, functions, weights,
                               seed=cfg.train.seed * 1000 + r * 16, info=info)
        summary = sample_summary(samples)
        if info.is_main:
            round_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(kept_file, jsonl(sft_records(items, samples)))
            write_atomic(round_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            write_atomic(samples_file, jsonl(sample_records(items, samples)))
        dist.barrier()
    sample_seconds = time.perf_counter() - started

    train_files = [*kept_files, kept_file] if cfg.rs.accumulate else [kept_file]
    records = "".join(path.read_text() for path in train_files)
    row: dict[str, Any] = {"step": r, **summary, "time/sample_s": sample_seconds, "sft/examples": records.count("\n")}
    if not records:
        logger.warning(f"round {r}: no sample was kept (pass rate 0); the model is unchanged this round.")
        row["model_dir"] = model_path
    else:
        data_file = round_dir / "sft_data.jsonl"
        if info.is_main:
            write_atomic(data_file, records)
        dist.barrier()
        sft_cfg = sft_config(cfg, model_path, data_file, round_dir / "sft", tokenizer_spec)
        sft_cfg.train.resume = cfg.train.resume and (round_dir / "sft" / "run.json").is_file()
        result = run("sft", sft_cfg)
        last = result.metrics[-1] if result.metrics else {}
        row.update({"sft/loss": last.get("loss"), "sft/steps": last.get("step")})
        row["model_dir"] = str(result.final_model_dir)
    row["time/sft_s"] = time.perf_counter() - started - sample_seconds
    if info.is_main:
        write_atomic(round_dir / "round.json", json.dumps(row) + "\n")
    dist.barrier()
    return row
