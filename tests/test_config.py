"""Typed configs: YAML + dotted overrides, unknown keys with suggestions, type checks, env expansion, help."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from alignkit.config import config_help, config_to_dict, field_docs, load_config, save_config
from alignkit.errors import ConfigError
from alignkit.trainers.configs import PretrainConfig, SFTConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides(tmp_path: Path) -> None:
    recipe = write(tmp_path, "optim:\n  lr: 3e-4\n  betas: [0.9, 0.95]\ntrain:\n  batch_size: 16\n  micro_batch_size: 4\n")
    cfg = load_config(SFTConfig, recipe, ["train.max_steps=7", "optim.schedule=linear", "model.init.hidden_size=64",
                                          "data.train=123", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.optim.lr == 3e-4  # YAML 1.1 reads `3e-4` as a string; the float field accepts it
    assert cfg.optim.betas == (0.9, 0.95)
    assert (cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.max_steps) == (16, 4, 7)
    assert cfg.optim.schedule == "linear"
    assert cfg.model.init == {"hidden_size": 64}
    assert cfg.data.train == "123"  # a str field keeps the override text as written
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.max_length == 512  # untouched defaults stay


@pytest.mark.parametrize("null", ["null", "~", "Null", "NULL"])
def test_null_override_means_none_for_every_optional_field(tmp_path: Path, null: str) -> None:
    # The recipe sets every optional field; `key=null` on the command line clears it, strings included (these came
    # back as the string 'null' when string fields kept the override text verbatim).
    recipe = write(tmp_path, "model: {path: some/model}\ntokenizer: some/tokenizer\nchat_template: chatml\n"
                             "data: {train: a.jsonl, eval: b.jsonl, eval_size: 8, limit: 100, truncation: left}\n"
                             "train: {max_steps: 5}\n")
    keys = ["model.path", "tokenizer", "chat_template", "data.eval", "data.eval_size", "data.limit",
            "data.truncation", "train.max_steps"]
    cfg = load_config(SFTConfig, recipe, [f"{key}={null}" for key in keys])
    assert cfg.model.path is None and cfg.tokenizer is None and cfg.chat_template is None
    assert cfg.data.eval is None and cfg.data.eval_size is None and cfg.data.limit is None
    assert cfg.data.truncation is None and cfg.train.max_steps is None
    assert cfg.data.train == "a.jsonl"


def test_null_override_of_reference_path() -> None:
    from alignkit.trainers.preference_configs import DPOConfig

    assert load_config(DPOConfig, None, ["reference.path=some/model"]).reference.path == "some/model"
    assert load_config(DPOConfig, None, ["reference.path=null"]).reference.path is None


def test_quoted_override_is_a_string_and_none_is_not_null() -> None:
    # YAML's quotes keep the word: `tokenizer="'null'"` in a shell is the text 'null' with its quotes.
    assert load_config(SFTConfig, None, ["tokenizer='null'"]).tokenizer == "null"
    assert load_config(SFTConfig, None, ['data.train="~"']).data.train == "~"
    assert load_config(SFTConfig, None, ["data.train=null.jsonl"]).data.train == "null.jsonl"
    with pytest.raises(ConfigError, match=r"data\.train must be str \| list\[str\]; got None"):
        load_config(SFTConfig, None, ["data.train=null"])
    with pytest.raises(ConfigError, match=r"train\.max_steps must be int \| None; got 'None' \(str\) \(None is written null\)"):
        load_config(SFTConfig, None, ["train.max_steps=None"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", r"unknown config key optim\.lrr.*Did you mean optim\.lr\?"),
        ("lr=1", r"unknown config key lr.*Did you mean optim\.lr\?"),
        ("trian.seed=1", r"unknown config key trian.*Did you mean train\?"),
    ],
)
def test_unknown_key_names_it_and_suggests(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(SFTConfig, None, [override])


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    recipe = write(tmp_path, "train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: unknown config key train\.max_step.*train\.max_steps"):
        load_config(SFTConfig, recipe)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps=ten", r"train\.max_steps must be int \| None; got 'ten'"),
        ("train.resume=maybe", r"train\.resume must be bool; got 'maybe'"),
        ("train.precision=fp16", r"train\.precision must be one of 'fp32', 'bf16'; got 'fp16'"),
        ("optim.betas=[0.9]", r"optim\.betas must have 2 items"),
        ("optim.lr=fast", r"optim\.lr must be float"),
        ("model.init=5", r"model\.init must be dict\[str, any\] \| None; got 5"),
    ],
)
def test_wrong_types_are_named(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^command line: " + message):
        load_config(SFTConfig, None, [override])
    # With a recipe file, a bad override is still named as the command line's, not the file's.
    with pytest.raises(ConfigError, match="^command line: " + message):
        load_config(SFTConfig, write(tmp_path, "train:\n  max_steps: 10\n"), [override])


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch_size"):
        load_config(SFTConfig, None, ["train.batch_size=6", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="model.path and model.init are both set"):
        load_config(PretrainConfig, None, ["model.path=x", "model.init={hidden_size: 8}"])


def test_env_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNKIT_TEST_DATA", "/data/here")
    monkeypatch.delenv("ALIGNKIT_UNSET_VAR", raising=False)
    recipe = write(tmp_path, "data:\n  train: ${ALIGNKIT_TEST_DATA}/a.json\n  eval: ${ALIGNKIT_UNSET_VAR:-fallback}/b.json\n")
    cfg = load_config(SFTConfig, recipe)
    assert cfg.data.train == "/data/here/a.json"
    assert cfg.data.eval == "fallback/b.json"
    with pytest.raises(ConfigError, match=r"data\.train uses \$\{ALIGNKIT_UNSET_VAR\}"):
        load_config(SFTConfig, None, ["data.train=${ALIGNKIT_UNSET_VAR}/x"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(PretrainConfig, None, ["optim.lr=0.001", "model.init={hidden_size: 64, num_layers: 2}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(PretrainConfig, tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["betas"] == [0.9, 0.999]
    assert config_to_dict(cfg)["model"]["init"] == {"hidden_size": 64, "num_layers": 2}


def test_help_lists_every_field_with_its_doc() -> None:
    text = config_help(SFTConfig)
    for line in ("optim.lr (float, default 1e-05)", "Peak learning rate (AdamW).", "train.precision ('fp32' | 'bf16'",
                 "lora.target_modules", "Linear layers that get adapters", "data.packing (bool | None, default False)"):
        assert line in text, line
    # A section's defaults are the ones its stage sets (pretraining packs; the preference stages decide per device).
    assert "data.packing (bool | None, default True)" in config_help(PretrainConfig)
    from alignkit.trainers.preference_configs import DPOConfig

    assert "data.packing (bool | None, default None)" in config_help(DPOConfig)
    for cls in (SFTConfig, PretrainConfig):
        for f in dataclasses.fields(cls):
            assert field_docs(cls).get(f.name), f"{cls.__name__}.{f.name} has no doc"
    for section in ("model", "data", "optim", "train", "lora"):
        sub = type(getattr(SFTConfig(), section))
        docs = field_docs(sub)
        for f in dataclasses.fields(sub):
            assert f"{section}.{f.name} (" in text
            assert docs.get(f.name), f"{section}.{f.name} has no doc"


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, write(tmp_path, "train: [\n"))


def test_partial_section_keeps_the_stage_defaults(tmp_path: Path) -> None:
    # PretrainConfig's data section defaults to text + split + packing; naming only `train` must keep them.
    cfg = load_config(PretrainConfig, write(tmp_path, "data:\n  train: corpus.txt\noptim:\n  lr: 0.01\n"))
    assert (cfg.data.format, cfg.data.truncation, cfg.data.packing) == ("text", "split", True)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (0.01, 0.1, 10)
