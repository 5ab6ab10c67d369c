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


def test_shared_prompt_batches_give_the_one_row_per_episode_logprobs_values_and_gradients() -> None:
    """GRPO's completions of one prompt share a row after one copy of the prompt; log-probs, entropies, critic
    values and the gradients all equal the plain layout's (fp32 rounding), with prompts of different lengths,
    completions of different lengths (some ending early) and a group split across micro-batches (size 5, G 3)."""
    from alignkit.model import LlamaForCausalLM, LlamaForScore, ModelConfig
    from alignkit.rollout import completion_logprobs, completion_values

    tokenizer = load_tokenizer("byte")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, **TINY)
    torch.manual_seed(0)
    model, critic = LlamaForCausalLM(config), LlamaForScore(config)
    model.init_weights()
    critic.init_weights()
    prompts = [tokenizer.encode("hello there"), tokenizer.encode("hi"), tokenizer.encode("a longer question?")]
    params = SamplingParams(max_new_tokens=9, temperature=1.0, seed=5,
                            stop_token_ids=list(range(0, tokenizer.vocab_size, 7)))  # some completions end early
    rollout = generate_rollout(model, tokenizer, prompts, params, group_size=3)
    assert len({len(c.token_ids) for c in rollout.completions}) > 1  # completions of different lengths
    advantages = torch.randn(9)
    plain = episode_batches(rollout, 5, advantages=advantages, pad_id=0)
    shared = episode_batches(rollout, 5, advantages=advantages, pad_id=0, share_prompts=True)
    # Two micro-batches: [p0 x3, p1 x2] and [p1 x1, p2 x3]: four rows instead of nine prompt copies.
    assert [b.input_ids.shape[0] for b in shared] == [2, 2] and all(b.shared for b in shared)
    assert sum(int(b.input_ids.ne(0).sum()) for b in shared) < sum(int(b.input_ids.ne(0).sum()) for b in plain)

    def run(batches: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        critic.zero_grad()
        logps, entropies, values = [], [], []
        for batch in batches:
            lp, ent = completion_logprobs(model, batch, temperature=0.8, with_entropy=True)
            v = completion_values(critic, batch)
            ((lp * batch.advantages).sum() + (v * batch.mask).pow(2).sum()).backward()
            logps.append(lp.detach()), entropies.append(ent), values.append(v.detach())
        grads = [p.grad.clone() for p in (*model.parameters(), *critic.parameters())]
        return torch.cat(logps), torch.cat(entropies), torch.cat(values), grads

    a, b = run(plain), run(shared)
    for x, y in zip(a[:3], b[:3]):
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5), float((x - y).abs().max())
    for x, y in zip(a[3], b[3]):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4), float((x - y).abs().max())
    with pytest.raises(ValueError, match="share_prompts=False"):
        shared[0].select([0])


def test_bf16_runs_sample_from_a_bf16_copy_and_fp32_runs_from_the_live_policy() -> None:
    import copy

    from alignkit.model import LlamaForCausalLM, ModelConfig
    from alignkit.rollout import sampling_model

    tokenizer = load_tokenizer("byte")
    torch.manual_seed(0)
    policy = LlamaForCausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, tie_word_embeddings=True, **TINY))
    policy.init_weights()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    prompts = [tokenizer.encode("hello there"), tokenizer.encode("hi")]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    cpu = torch.device("cpu")
    with sampling_model(policy, precision="fp32", device=cpu, rows=4) as sampler:
        assert sampler is policy
    with sampling_model(policy, precision="bf16", device=cpu, rows=4) as sampler:
        assert sampler is not policy and sampler.dtype == torch.bfloat16 and not sampler.training
        assert sampler.lm_head.weight is sampler.model.embed_tokens.weight  # still tied
        assert not any(p.requires_grad for p in sampler.parameters())
        sampled = generate_rollout(sampler, tokenizer, prompts, params, group_size=2)
    # The same samples as a plain bf16 copy of the policy gives; the live fp32 weights are untouched.
    reference = generate_rollout(copy.deepcopy(policy).to(torch.bfloat16), tokenizer, prompts, params, group_size=2)
    assert sampled.completion_ids == reference.completion_ids
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in policy.named_parameters())


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
    # Too few prompts for one iteration (16 completions / 4 per prompt = 4 prompts; data.limit keeps 3): one
    # message with every setting that would fit.
    with pytest.raises(DataError, match=r"3 prompts, fewer than one iteration's 4 \(train.batch_size=16 completions "
                       r"/ rollout.num_generations=4 per prompt\).*train.batch_size=12 .*rollout.num_generations "
                       r"\(now 4\).*data.limit \(now 3\).*rollout.max_prompt_length \(now 64\)"):
        run("grpo", grpo_cfg(tmp_path, **{"data.limit": 3}))


def fake_draw(rewards: list[list[float]]) -> tuple[Any, torch.Tensor, dict[str, list[float]]]:
    """A rollout of len(rewards) prompts whose G completions have the given rewards (token id = prompt number)."""
    from alignkit.generation import Completion
    from alignkit.rollout import Rollout

    g = len(rewards[0])
    completions = [Completion(prompt_index=i, token_ids=[int(r * 10)], logprobs=[0.0], raw_logprobs=[0.0],
                              finish_reason="stop", text=f"{i}") for i, group in enumerate(rewards) for r in group]
    flat = [r for group in rewards for r in group]
    return Rollout([[i] for i in range(len(rewards))], completions, g), torch.tensor(flat, dtype=torch.float32), {"f": flat}


def test_dynamic_sampling_keeps_groups_whose_rewards_differ() -> None:
    from alignkit.trainers.grpo import dynamic_sample

    draws = iter([fake_draw([[1, 1], [0, 1], [0, 0]]), fake_draw([[1, 0], [1, 1], [0, 1]])])
    first = fake_draw([[0, 0], [1, 0], [1, 1]])
    rollout, rewards, values, extra = dynamic_sample(*first, lambda: next(draws), 2, groups_wanted=3, max_rounds=3)
    # Draw 1 gives one informative group, draw 2 one more, draw 3 two: the first three are kept, in order.
    assert len(extra) == 2 and [c.text for c in rollout.completions] == ["1", "1", "1", "1", "0", "0"]
    assert rewards.tolist() == [1, 0, 0, 1, 1, 0] and values == {"f": [1, 0, 0, 1, 1, 0]}
    assert rollout.prompt_ids == [[1], [1], [0]]
    # Out of draws: what was found is trained on; nothing found: the first draw as it is (zero advantages).
    draws = iter([fake_draw([[1, 1], [0, 0], [0, 0]])])
    rollout, rewards, _, extra = dynamic_sample(*first, lambda: next(draws), 2, groups_wanted=3, max_rounds=2)
    assert len(extra) == 1 and rewards.tolist() == [1, 0]
    rollout, rewards, _, extra = dynamic_sample(*fake_draw([[0, 0]]), lambda: fake_draw([[1, 1]]), 2,
                                                groups_wanted=1, max_rounds=2)
    assert len(extra) == 1 and rewards.tolist() == [0, 0]


BINARY = '''
def has_e(prompts, completions, **fields):
    """1 when the completion contains an "e": most groups of a random policy are all 0 or all 1."""
    return [float("e" in c) for c in completions]
'''


def test_dynamic_sampling_end_to_end_and_resume(tmp_path: Path) -> None:
    def cfg(where: Path, **overrides: Any) -> GRPOConfig:
        where.mkdir(parents=True, exist_ok=True)
        (where / "binary.py").write_text(BINARY)
        return grpo_cfg(where, **{"grpo.reward_funcs": [f"{where / 'binary.py'}:has_e"], "grpo.dynamic_sampling": True,
                                  "grpo.max_sampling_rounds": 4, "train.save_every": 2, **overrides})

    full = run("grpo", cfg(tmp_path / "a", **{"train.max_steps": 4})).metrics
    assert all(1 <= r["dynamic_sampling/draws"] <= 4 for r in full)
    assert any(r["dynamic_sampling/draws"] > 1 for r in full)  # some steps had to draw more prompts
    assert all(r["dynamic_sampling/groups_kept"] <= 4 for r in full)
    run("grpo", cfg(tmp_path / "b", **{"train.max_steps": 2}))
    resumed = run("grpo", cfg(tmp_path / "b", **{"train.max_steps": 4, "train.resume": True})).metrics
    for a, b in zip(full, resumed):
        for key in ("loss", "reward", "dynamic_sampling/draws", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)


def test_one_step_per_rollout_in_bf16_takes_the_old_logprobs_from_its_own_forward(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """old_logprobs auto in bf16: with num_iterations 1 no forward recomputes the old log-probs (the step is on
    policy, the ratio exactly 1); with 2, or old_logprobs recompute, one forward per rollout does."""
    import alignkit.trainers.grpo as grpo

    calls: list[str] = []
    real = grpo.attach_logprobs

    def counting(batches: Any, model: Any, *, into: str, **kwargs: Any) -> None:
        calls.append(into)
        real(batches, model, into=into, **kwargs)

    monkeypatch.setattr(grpo, "attach_logprobs", counting)
    for name, overrides, expected in (("auto1", {}, 0), ("auto2", {"grpo.num_iterations": 2}, 2),
                                      ("recompute", {"grpo.old_logprobs": "recompute"}, 2)):
        calls.clear()
        rows = run("grpo", grpo_cfg(tmp_path / name, **{"train.max_steps": 2, "train.precision": "bf16",
                                                        **overrides})).metrics
        assert calls.count("old_logps") == expected, name
        if name == "auto1":
            assert all(r["clip_ratio/region_mean"] == 0 for r in rows)
