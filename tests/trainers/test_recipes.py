"""The shipped recipes load into their stage configs (every key known, every type right)."""

from __future__ import annotations

import pytest

from alignkit.config import load_config
from alignkit.trainers.configs import PretrainConfig, SFTConfig
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize(("name", "cls"), [("pretrain_tiny_shakespeare", PretrainConfig),
                                           ("sft_smollm2_alpaca_lora", SFTConfig)])
def test_recipe_loads(name: str, cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNKIT_SHARED_DATA", "/data")
    cfg = load_config(cls, REPO_ROOT / "recipes" / f"{name}.yaml")
    assert cfg.data.train.startswith("/data/")
    assert cfg.train.batch_size % cfg.train.micro_batch_size == 0
    if cls is SFTConfig:
        assert cfg.model.path == "smollm2-135m-instruct" and cfg.lora.enabled
    else:
        assert cfg.model.init is not None and cfg.tokenizer == "byte"


@pytest.mark.parametrize("name", ["grpo_smollm2_word_problems", "grpo_smollm2_gsm8k"])
def test_grpo_recipe_loads(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both GRPO recipes load, their reward functions resolve, and they prompt as the word-problem evaluation does."""
    from alignkit.rewards.verifiable import load_reward_function
    from alignkit.tasks.word_problems import SYSTEM_PROMPT
    from alignkit.trainers.rl_configs import GRPOConfig

    monkeypatch.delenv("ALIGNKIT_SHARED_DATA", raising=False)
    cfg = load_config(GRPOConfig, REPO_ROOT / "recipes" / f"{name}.yaml")
    assert cfg.model.path == "smollm2-135m-instruct"
    assert cfg.rollout.system_prompt == SYSTEM_PROMPT
    assert all(callable(load_reward_function(spec)) for spec in cfg.grpo.reward_funcs)
    assert cfg.train.batch_size % cfg.rollout.num_generations == 0 and cfg.train.batch_size % cfg.train.micro_batch_size == 0
    if name == "grpo_smollm2_gsm8k":
        assert cfg.data.train == "../shared/data/gsm8k/train.jsonl"  # the default beside the repository
        assert (cfg.train.device, cfg.train.precision) == ("cuda", "bf16")
        monkeypatch.setenv("ALIGNKIT_SHARED_DATA", "/data")
        assert load_config(GRPOConfig, REPO_ROOT / "recipes" / f"{name}.yaml").data.train == "/data/gsm8k/train.jsonl"
    else:
        assert cfg.data.train == "runs/data/word_problems/train.jsonl"  # written by python -m alignkit.tasks.word_problems
        assert cfg.train.device == "auto" and cfg.train.max_steps == 25
