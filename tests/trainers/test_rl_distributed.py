"""The RL trainers under torchrun with two processes: GRPO with dynamic sampling under FSDP2 (the ranks keep equal
group counts, or the sharded forwards would wait on each other forever) resumes like the uninterrupted run, and a
rejection-sampling round shards its prompts and gathers every sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "max_position_embeddings": 128, "initializer_range": 0.05}
REWARDS = '''
def has_e(prompts, completions, **fields):
    """1 when the completion contains an "e": most groups of a random policy are all 0 or all 1."""
    return [float("e" in c) for c in completions]
'''


def torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "alignkit.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=400)


def inputs(tmp_path: Path) -> tuple[Path, Path]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"Say something {i}", "answer": str(i)}) + "\n"
                               for i in range(24)))
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS)
    return prompts, rewards


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grpo_dynamic_sampling_fsdp2_two_processes_and_resume(tmp_path: Path) -> None:
    prompts, rewards = inputs(tmp_path)
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"init": TINY}, "tokenizer": "byte", "data": {"train": str(prompts)},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "rollout": {"num_generations": 4, "max_completion_length": 8, "max_prompt_length": 64},
        "grpo": {"reward_funcs": [f"{rewards}:has_e"], "dynamic_sampling": True, "max_sampling_rounds": 4},
        "train": {"batch_size": 16, "micro_batch_size": 4, "report_to": [], "num_threads": 1, "peak_flops": 1e12,
                  "strategy": "fsdp2", "save_every": 2, "log_every": 1},
    }))
    full = torchrun(["train", "grpo", "-c", str(recipe), f"train.output_dir={tmp_path / 'a'}", "train.max_steps=4"],
                    tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    a = rows(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    assert any(r["dynamic_sampling/draws"] > 1 for r in a), [r["dynamic_sampling/draws"] for r in a]
    assert all(r["dynamic_sampling/groups_kept"] <= 2 for r in a)  # 2 prompts per rank and step
    assert (tmp_path / "a" / "final" / "model.safetensors").is_file()

    cut = torchrun(["train", "grpo", "-c", str(recipe), f"train.output_dir={tmp_path / 'b'}", "train.max_steps=2"],
                   tmp_path)
    assert cut.returncode == 0, cut.stderr[-3000:]
    resumed = torchrun(["train", "grpo", "-c", str(recipe), f"train.output_dir={tmp_path / 'b'}", "train.max_steps=4",
                        "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for x, y in zip(a, rows(tmp_path / "b" / "metrics.jsonl")):
        for key in ("loss", "reward", "dynamic_sampling/draws", "grad_norm"):
            assert x[key] == y[key], (x["step"], key)


def test_rejection_sampling_round_shards_prompts(tmp_path: Path) -> None:
    import torch

    from alignkit.checkpoint import save_hf_model
    from alignkit.model import LlamaForCausalLM, ModelConfig
    from alignkit.trainers.common import load_tokenizer

    tokenizer = load_tokenizer("byte")
    torch.manual_seed(0)
    config = {key: value for key, value in TINY.items()}
    model = LlamaForCausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id,
                                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                         **config))
    model.init_weights()
    save_hf_model(model, tmp_path / "model", tokenizer=tokenizer)
    prompts, rewards = inputs(tmp_path)
    recipe = tmp_path / "rs.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(tmp_path / "model")}, "data": {"train": str(prompts), "max_length": 64},
        "optim": {"lr": 1e-2, "schedule": "constant", "warmup_steps": 0},
        "rollout": {"num_generations": 4, "max_completion_length": 8, "max_prompt_length": 64},
        "rs": {"rounds": 1, "prompts_per_round": 7, "reward_funcs": [f"{rewards}:has_e"], "keep": "best"},
        "train": {"batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "report_to": [], "num_threads": 1,
                  "peak_flops": 1e12, "output_dir": str(tmp_path / "rs"), "log_every": 1},
    }))
    done = torchrun(["train", "rs", "-c", str(recipe)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = rows(tmp_path / "rs" / "round_1" / "samples.jsonl")
    # 7 prompts over 2 processes (4 + 3), every one's 4 samples gathered in order, one kept each.
    assert [s["prompt_index"] for s in samples] == [i // 4 for i in range(28)]
    assert sum(s["kept"] for s in samples) == 7
    [row] = rows(tmp_path / "rs" / "metrics.jsonl")
    assert row["prompts"] == 7 and row["sft/steps"] == 2
    assert (tmp_path / "rs" / "final" / "config.json").is_file()
