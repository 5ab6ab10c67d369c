"""`alignkit train grpo` end to end on a tiny model: the mean reward rises on a toy reward, the rollout's own log-probs
equal a training forward's (ratio 1 at the first step), a resumed run repeats the uninterrupted one, and bad input
is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from alignkit.config import config_from_dict
from alignkit.errors import ConfigError, DataError
from alignkit.generation import SamplingParams
from alignkit.rewards.verifiable import RewardError
from alignkit.rollout import attach_logprobs, episode_batches, generate_rollout, rollout_logprobs
from alignkit.trainers import run
from alignkit.trainers.common import load_tokenizer
from alignkit.trainers.rl_configs import GRPOConfig

REWARDS = '''
def lowercase(prompts, completions, **fields):
    """The share of a completion's characters that are lowercase letters: a dense toy reward."""
    return [sum(ch.islower() for ch in c) / max(1, len(c)) for c in completions]
'''
TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=128)


def prompts_file(tmp_path: Path, n: int = 16) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": f"Say something {i}", "answer": str(i)}) + "\n" for i in range(n)))
    return path


def grpo_cfg(tmp_path: Path, **overrides: Any) -> GRPOConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rewards = tmp_path / "toy_rewards.py"
    rewards.write_text(REWARDS)
    cfg: dict[str, Any] = {
        "model": {"init": {**TINY, "initializer_range": 0.05}}, "tokenizer": "byte",
        "data": {"train": str(prompts_file(tmp_path))},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "rollout": {"num_generations": 4, "max_completion_length": 8, "max_prompt_length": 64},
        "grpo": {"reward_funcs": [f"{rewards}:lowercase"], "loss_type": "grpo"},
        "train": {"batch_size": 16, "micro_batch_size": 8, "max_steps": 24, "report_to": [], "peak_flops": 1e12,
                  "output_dir": str(tmp_path / "run"), "log_every": 1},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        cfg.setdefault(section, {})[key] = value
    return config_from_dict(GRPOConfig, cfg)


def test_grpo_raises_a_toy_reward_and_logs_trl_metrics(tmp_path: Path) -> None:
    result = run("grpo", grpo_cfg(tmp_path, **{"optim.lr": 1e-2, "train.max_steps": 30}))
    rows = result.metrics
    assert [r["step"] for r in rows] == list(range(1, 31))
    # About 10% of random bytes are lowercase letters; the policy learns to write mostly letters (measured: 0.11 at
    # the first step, 0.98 at the last).
    first, last = sum(r["reward"] for r in rows[:4]) / 4, sum(r["reward"] for r in rows[-4:]) / 4
    assert first < 0.3 and last > 0.7, [round(r["reward"], 3) for r in rows]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/lowercase/mean", "rewards/lowercase/std",
                "completions/mean_length", "completions/min_length", "completions/max_length",
                "completions/clipped_ratio", "completions/mean_terminated_length", "entropy", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "clip_ratio/region_mean", "time/rollout_s", "time/optimization_s",
                "completions_per_s", "mfu"):
        assert key in rows[-1], key
    assert (result.final_model_dir / "model.safetensors").is_file()


def test_rollout_logprobs_equal_a_training_forward() -> None:
    """The sampling log-probs generate returns (logits / T, no filter) are the policy's: ratio 1 within 1e-5."""
    tokenizer = load_tokenizer("byte")
    from alignkit.model import LlamaForCausalLM, ModelConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, **TINY))
    model.init_weights()
    prompts = [tokenizer.encode("hello there"), tokenizer.encode("hi")]
    rollout = generate_rollout(model, tokenizer, prompts, SamplingParams(max_new_tokens=10, temperature=0.7, seed=3),
                               group_size=3)
    batches = episode_batches(rollout, 4, advantages=torch.zeros(6))
    attach_logprobs(batches, model, into="old_logps", temperature=0.7, device=torch.device("cpu"))
    recomputed = torch.cat([b.old_logps for b in batches])  # type: ignore[misc]
    mask = torch.cat([b.mask for b in batches])
    ratio = torch.exp((recomputed - rollout_logprobs(rollout)) * mask)
    assert float((ratio - 1).abs().max()) < 1e-5


def test_resume_repeats_the_uninterrupted_run(tmp_path: Path) -> None:
    full = run("grpo", grpo_cfg(tmp_path / "a", **{"train.max_steps": 6, "train.save_every": 3})).metrics
    cfg = grpo_cfg(tmp_path / "b", **{"train.max_steps": 3, "train.save_every": 3})
    run("grpo", cfg)
    torch.manual_seed(1234)  # scrambled: the checkpoint restores the RNG the rollouts draw from
    resumed = run("grpo", grpo_cfg(tmp_path / "b", **{"train.max_steps": 6, "train.save_every": 3,
                                                      "train.resume": True})).metrics
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(full, resumed):
        for key in ("loss", "reward", "grad_norm", "completions/mean_length"):
            assert a[key] == b[key], (a["step"], key)


def test_bad_input_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num_generations must be at least 2"):
        grpo_cfg(tmp_path, **{"rollout.num_generations": 1, "train.batch_size": 16})
    with pytest.raises(ConfigError, match="multiple of rollout.num_generations"):
        grpo_cfg(tmp_path, **{"train.batch_size": 18, "train.micro_batch_size": 6})
    missing = tmp_path / "missing_answer.jsonl"
    missing.write_text(json.dumps({"question": "a"}) + "\n")
    with pytest.raises(DataError, match=r"missing_answer.jsonl.*has no 'answer' field"):
        run("grpo", grpo_cfg(tmp_path, **{"data.train": str(missing)}))
    broken = tmp_path / "broken_rewards.py"
    broken.write_text("def bad(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n")
    with pytest.raises(RewardError, match=r"'bad' returned nan for completion 0 of prompt 0"):
        run("grpo", grpo_cfg(tmp_path, **{"grpo.reward_funcs": [f"{broken}:bad"]}))
    assert not (tmp_path / "run" / "checkpoints").exists()
