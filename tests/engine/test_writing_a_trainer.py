"""The REINFORCE trainer of docs/writing_a_trainer.md (examples/reinforce.py) is a test of the step API: rollouts
inside the loop, two optimizers, a critic-only warm-up that leaves the policy untouched, a reward that rises, and a
resumed run equal to the uninterrupted one bit for bit."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from alignkit.engine.checkpoint import load_model_state
from tests.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "reinforce.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reinforce_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


reinforce = load_example()


def config(**train: object) -> object:
    cfg = reinforce.ReinforceConfig()
    cfg.train = dataclasses.replace(cfg.train, peak_flops=1e12, **train)
    return cfg


def devnull() -> object:
    return open(os.devnull, "w")  # noqa: SIM115


def test_the_doc_shows_the_example_verbatim() -> None:
    doc = (REPO_ROOT / "docs" / "writing_a_trainer.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert EXAMPLE.read_text() in blocks
    assert len(EXAMPLE.read_text().splitlines()) < 200


def test_mean_reward_rises(tmp_path: Path) -> None:
    rows = reinforce.train(config(max_steps=20), str(tmp_path), stream=devnull())
    rewards = [r["reward"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 21))
    # Random init writes the target token 8 / 16 = 0.5 times per completion on average.
    assert sum(rewards[:4]) / 4 < 1.0
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 1.0, rewards
    assert {"lr/policy", "grad_norm/policy", "lr/value", "grad_norm/value", "mfu"} <= set(rows[-1])


def test_critic_only_warmup_leaves_the_policy_untouched(tmp_path: Path) -> None:
    cfg = config(max_steps=2)
    rows = reinforce.train(cfg, str(tmp_path), stream=devnull())
    assert all("grad_norm/policy" not in r and "grad_norm/value" in r for r in rows)
    initial_policy, initial_value = reinforce.build_models(cfg)
    saved = tmp_path / "checkpoints" / "step_000002"
    policy, value = reinforce.build_models(cfg)
    torch.manual_seed(99)
    for model in (policy, value):  # scrambled, so that the values below come from the checkpoint
        for p in model.parameters():
            p.data.normal_()
    load_model_state(saved, "policy", model=policy, optimizer=None, device=torch.device("cpu"))
    load_model_state(saved, "value", model=value, optimizer=None, device=torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(policy.parameters(), initial_policy.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(value.parameters(), initial_value.parameters()))


class Killed(Exception):
    pass


def test_resume_mid_run_equals_the_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = reinforce.train(config(max_steps=8, save_every=3), str(tmp_path / "full"), stream=devnull())

    calls = {"n": 0}
    original = reinforce.Prompts.next

    def dies_at_seventh_rollout(self: object) -> list[list[int]]:
        calls["n"] += 1
        if calls["n"] == 7:
            raise Killed
        return original(self)

    monkeypatch.setattr(reinforce.Prompts, "next", dies_at_seventh_rollout)
    with pytest.raises(Killed):
        reinforce.train(config(max_steps=8, save_every=3), str(tmp_path / "split"), stream=devnull())
    monkeypatch.setattr(reinforce.Prompts, "next", original)
    # Resumes from step 6; torch's RNG is scrambled first to prove the checkpoint restores it.
    torch.manual_seed(12345)
    resumed = reinforce.train(config(max_steps=8, save_every=3, resume=True), str(tmp_path / "split"),
                              stream=devnull())
    assert [r["step"] for r in resumed] == list(range(1, 9))
    keys = ("loss", "reward", "grad_norm/value", "value/mean", "num_episodes")
    for a, b in zip(full, resumed):
        for key in keys + (("grad_norm/policy",) if a["step"] > 2 else ()):
            assert a[key] == b[key], (a["step"], key)
