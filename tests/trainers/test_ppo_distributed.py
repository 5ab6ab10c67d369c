"""`alignkit train ppo` under torchrun with two DDP processes: advantages whitened over both ranks' completions, a
PTX micro-batch per minibatch on each rank (first, so the last micro-batch, which syncs the gradients, runs the
critic too), and a resumed run that repeats the uninterrupted one (KL controller, reward moments, PTX stream)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.trainers.test_rl_distributed import TINY, rows, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REWARDS = '''
def lowercase(prompts, completions, **fields):
    return [sum(ch.islower() for ch in c) / max(1, len(c)) for c in completions]
'''


def test_ppo_ddp_two_processes_with_ptx_resumes_exactly(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"Say something {i}"}) + "\n" for i in range(16)))
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS)
    ptx = tmp_path / "ptx.txt"
    ptx.write_text("".join(f"the cat number {i} sat on the warm mat.\n" for i in range(64)))
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"init": TINY}, "tokenizer": "byte", "data": {"train": str(prompts)},
        "optim": {"lr": 1e-2, "schedule": "constant"},
        "rollout": {"max_completion_length": 8, "max_prompt_length": 64},
        "ppo": {"reward_funcs": [f"{rewards}:lowercase"], "num_ppo_epochs": 2, "num_mini_batches": 2,
                "adaptive_kl": True, "target_kl": 0.5, "horizon": 32.0, "reward_norm": True, "ptx_coef": 0.5},
        "ptx": {"train": str(ptx), "max_length": 32},
        "train": {"batch_size": 16, "micro_batch_size": 4, "report_to": [], "num_threads": 1, "peak_flops": 1e12,
                  "save_every": 2, "log_every": 1},
    }))
    full = torchrun(["train", "ppo", "-c", str(recipe), f"train.output_dir={tmp_path / 'a'}", "train.max_steps=4"],
                    tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    a = rows(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    assert all(r["num_tokens"] > 0 and "loss/ptx" in r for r in a)
    assert (tmp_path / "a" / "final" / "model.safetensors").is_file()

    cut = torchrun(["train", "ppo", "-c", str(recipe), f"train.output_dir={tmp_path / 'b'}", "train.max_steps=2"],
                   tmp_path)
    assert cut.returncode == 0, cut.stderr[-3000:]
    resumed = torchrun(["train", "ppo", "-c", str(recipe), f"train.output_dir={tmp_path / 'b'}", "train.max_steps=4",
                        "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for x, y in zip(a, rows(tmp_path / "b" / "metrics.jsonl")):
        for key in ("loss", "reward", "objective/kl", "objective/kl_coef", "loss/ptx", "grad_norm/policy",
                    "grad_norm/critic"):
            assert x[key] == y[key], (x["step"], key)
