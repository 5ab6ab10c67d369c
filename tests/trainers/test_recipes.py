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
