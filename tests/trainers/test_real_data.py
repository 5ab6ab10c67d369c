"""Training on the shared real datasets: Tiny Shakespeare pretraining and SmolLM2 LoRA SFT on Alpaca."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from alignkit.config import config_from_dict
from alignkit.trainers import run
from alignkit.trainers.common import load_tokenizer
from alignkit.trainers.configs import PretrainConfig, SFTConfig

pytestmark = pytest.mark.slow


def unigram_entropy(ids: list[int]) -> float:
    """H = -sum_t p(t) ln p(t) over token frequencies: the loss of the best model that ignores context."""
    counts = Counter(ids)
    total = len(ids)
    return -sum(c / total * math.log(c / total) for c in counts.values())


def test_tiny_shakespeare_pretraining_beats_unigram_entropy(shared_data: Path, tmp_path: Path) -> None:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    entropy = unigram_entropy(load_tokenizer("byte").encode(text))
    assert 3.0 < entropy < 3.5  # about 4.7 bits per character: 65 characters, far from uniform
    cfg = config_from_dict(PretrainConfig, {
        "model": {"init": {"hidden_size": 64, "intermediate_size": 192, "num_layers": 2, "num_heads": 4,
                           "num_kv_heads": 2, "max_position_embeddings": 128}},
        "tokenizer": "byte",
        "data": {"train": str(shared_data / "tinyshakespeare" / "input.txt"), "max_length": 128, "eval_size": 64},
        "optim": {"lr": 5e-3, "warmup_steps": 10, "betas": [0.9, 0.95], "min_lr_ratio": 0.1},
        "train": {"batch_size": 16, "micro_batch_size": 16, "max_steps": 150, "precision": "bf16",
                  "log_every": 10, "eval_every": 75, "eval_on_start": True, "output_dir": str(tmp_path / "run"),
                  "report_to": []},
    })
    result = run("pretrain", cfg)
    evals = [r["eval/loss"] for r in result.metrics if "eval/loss" in r]
    assert evals[0] == pytest.approx(math.log(259), rel=0.05)  # untrained: uniform over the vocabulary
    # Context helps: held-out loss ends well below what any unigram model can reach.
    assert evals[-1] < entropy - 0.5, (evals, entropy)


def test_smollm2_lora_sft_on_alpaca_lowers_held_out_loss(shared_data: Path, smollm2_gguf: str, tmp_path: Path) -> None:
    records = json.loads((shared_data / "alpaca" / "alpaca_train_2k.json").read_text())[:64]
    data = tmp_path / "alpaca64.json"
    data.write_text(json.dumps(records))
    cfg = config_from_dict(SFTConfig, {
        "model": {"path": smollm2_gguf},
        "data": {"train": str(data), "format": "instruction", "max_length": 128, "eval_size": 16, "packing": True},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "lora": {"enabled": True, "rank": 8, "alpha": 16},
        "train": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 8, "precision": "bf16",
                  "eval_on_start": True, "output_dir": str(tmp_path / "run"), "report_to": []},
    })
    result = run("sft", cfg)
    evals = [r["eval/loss"] for r in result.metrics if "eval/loss" in r]
    assert len(evals) == 2
    assert evals[-1] < evals[0] - 0.05, evals
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()
