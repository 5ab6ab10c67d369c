"""LoRA: parity with `peft` in both directions, merge, disable, freezing, and clear errors for bad adapters."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alignkit.errors import CheckpointError, ConfigError
from alignkit.model import LlamaForScore
from alignkit.model.lora import (
    DECODER_LINEAR_NAMES,
    LoRALinear,
    apply_lora,
    disable_adapters,
    load_adapter,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from tests.conftest import tiny_config
from tests.model.test_llama import hf_twin, make

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def randomise_lora_b(model: torch.nn.Module) -> None:
    """B starts at zero (the adapter is a no-op); make it non-zero so parity tests can fail."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "options",
    [
        dict(target_modules=QKVO),
        dict(target_modules="all-linear"),
        dict(target_modules=["q_proj", "v_proj"], use_rslora=True, dropout=0.1),
    ],
    ids=["qkvo", "all-linear", "qv-rslora-dropout"],
)
def test_alignkit_adapter_loads_in_peft_with_same_logits(tmp_path: Path, options: dict) -> None:
    model = make(tiny_config())
    hf = hf_twin(model)  # before LoRA: the twin is the plain base
    input_ids = torch.randint(0, 128, (2, 16))
    base_logits = logits(model, input_ids)
    apply_lora(model, rank=4, alpha=8, **options)
    randomise_lora_b(model)
    model.eval()
    ours = logits(model, input_ids)
    assert max_diff(ours, base_logits) > 1e-2  # the adapter really changes the output
    save_adapter(model, tmp_path / "ours", base_model_name_or_path="tiny-llama")

    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    assert max_diff(logits(peft_model, input_ids), ours) <= 1e-5

    # Same file layout as an adapter peft itself saves for the same config.
    targets = options["target_modules"]
    reference = peft.get_peft_model(
        hf_twin(make(tiny_config())),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=options.get("use_rslora", False),
                        task_type="CAUSAL_LM"),
    )
    reference.save_pretrained(str(tmp_path / "peft"))
    ours_keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).keys()
    peft_keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).keys()
    assert sorted(ours_keys) == sorted(peft_keys)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in ours_keys
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == "tiny-llama"
    expected_targets = list(DECODER_LINEAR_NAMES) if targets == "all-linear" else targets
    assert config["target_modules"] == expected_targets


@pytest.mark.parametrize(
    "peft_options",
    [
        dict(target_modules=QKVO),
        dict(target_modules="all-linear", lora_dropout=0.05),
        # Per-module ranks / alphas and a layer subset: the patterns peft writes when asked.
        dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
             alpha_pattern={"down_proj": 3}, layers_to_transform=[1]),
    ],
    ids=["qkvo", "all-linear", "patterns"],
)
def test_peft_adapter_loads_in_alignkit_with_same_logits(tmp_path: Path, peft_options: dict) -> None:
    model = make(tiny_config())
    peft_model = peft.get_peft_model(hf_twin(model), peft.LoraConfig(r=4, lora_alpha=16, **peft_options))
    randomise_lora_b(peft_model)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    peft_model.eval()
    input_ids = torch.randint(0, 128, (2, 16))
    base_logits = logits(model, input_ids)
    base = copy.deepcopy(model)

    load_adapter(model, tmp_path / "peft")
    model.eval()
    ours = logits(model, input_ids)
    expected = logits(peft_model, input_ids)
    assert max_diff(expected, base_logits) > 1e-2
    assert max_diff(ours, expected) <= 1e-5
    if "rank_pattern" in peft_options:
        ranks = {name: layer.rank for name, layer in lora_layers(model).items()}
        assert ranks == {"model.layers.1.self_attn.q_proj": 4, "model.layers.1.self_attn.v_proj": 2,
                         "model.layers.1.mlp.down_proj": 4}
        assert lora_layers(model)["model.layers.1.mlp.down_proj"].scaling == 3 / 4

    # Re-saved by alignkit, the adapter still loads in peft with the same output (patterns included).
    save_adapter(model, tmp_path / "resaved", base_model_name_or_path="tiny")
    again = peft.PeftModel.from_pretrained(hf_twin(base), str(tmp_path / "resaved")).eval()
    assert max_diff(logits(again, input_ids), expected) <= 1e-5


def test_reward_model_adapter_round_trips_through_peft(tmp_path: Path) -> None:
    config = tiny_config(pad_token_id=0)
    model = LlamaForScore(config)
    model.init_weights()
    model.eval()
    hf_config = transformers.AutoConfig.for_model(
        **config.to_hf(architecture="LlamaForSequenceClassification"), num_labels=1
    )
    hf = transformers.AutoModelForSequenceClassification.from_config(hf_config).eval()
    assert not hf.load_state_dict(model.state_dict(), strict=True).missing_keys

    apply_lora(model, rank=4, alpha=8)  # modules_to_save defaults to the score head
    assert model.score.weight.requires_grad
    randomise_lora_b(model)
    with torch.no_grad():
        model.score.weight.add_(torch.randn_like(model.score.weight))
    save_adapter(model, tmp_path / "rm", base_model_name_or_path="tiny-rm")
    config_json = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert config_json["task_type"] == "SEQ_CLS" and config_json["modules_to_save"] == ["score"]
    assert "base_model.model.score.weight" in load_file(str(tmp_path / "rm" / "adapter_model.safetensors"))

    input_ids = torch.randint(1, 128, (2, 10))  # no pad token: HF pools at the last position
    with torch.no_grad():
        ours = model(input_ids)[:, -1]
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "rm")).eval()(input_ids).logits[:, 0]
        fresh = LlamaForScore(config)
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
        fresh.score.weight.zero_()  # the saved head must come back from the adapter file
        load_adapter(fresh, tmp_path / "rm").eval()
        reloaded = fresh(input_ids)[:, -1]
    assert max_diff(ours, theirs) <= 1e-5
    assert torch.equal(ours, reloaded)


def test_merge_equals_adapter_and_returns_a_plain_model() -> None:
    model = make(tiny_config(attention_bias=True, o_proj_bias=True))
    base_keys = set(model.state_dict())
    apply_lora(model, rank=4, alpha=8, target_modules="all-linear")
    randomise_lora_b(model)
    input_ids = torch.randint(0, 128, (2, 16))
    adapted = logits(model, input_ids)
    merge_lora(model)
    merged = logits(model, input_ids)
    assert max_diff(merged, adapted) <= 1e-5
    assert not lora_layers(model)
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert set(model.state_dict()) == base_keys
    assert all(p.requires_grad for p in model.parameters())


def test_disable_adapters_gives_exact_base_logits_and_re_enables() -> None:
    model = make(tiny_config())
    input_ids = torch.randint(0, 128, (2, 16))
    base = logits(model, input_ids)
    apply_lora(model)
    assert torch.equal(logits(model, input_ids), base)  # B = 0 at init: the adapter starts as a no-op
    randomise_lora_b(model)
    adapted = logits(model, input_ids)
    assert max_diff(adapted, base) > 1e-2
    with disable_adapters(model):
        assert torch.equal(logits(model, input_ids), base)
    assert torch.equal(logits(model, input_ids), adapted)
    with pytest.raises(RuntimeError), disable_adapters(model):
        raise RuntimeError("an exception inside the block still re-enables the adapter")
    assert torch.equal(logits(model, input_ids), adapted)


def test_only_lora_parameters_train_and_init_matches_peft() -> None:
    model = make(tiny_config())
    apply_lora(model, rank=4, alpha=8)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {
        f"model.layers.{i}.self_attn.{proj}.lora_{ab}.weight" for i in range(2) for proj in QKVO for ab in "AB"
    }
    assert trainable == expected
    assert set(lora_state_dict(model)) == expected
    assert {id(p) for p in lora_parameters(model)} == {id(p) for n, p in model.named_parameters() if n in expected}
    # State dict keys of the base stay HF's.
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()

    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    # peft's default init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
    bound = 1 / math.sqrt(32)
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0

    randomise_lora_b(model)
    model.train()
    model(torch.randint(0, 128, (2, 8))).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in expected)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in expected)


def test_rslora_scaling() -> None:
    model = apply_lora(make(tiny_config()), rank=16, alpha=8, use_rslora=True)
    assert model.model.layers[0].self_attn.q_proj.scaling == 8 / math.sqrt(16)


def test_dropout_is_deterministic_in_eval_and_active_in_train() -> None:
    model = apply_lora(make(tiny_config()), dropout=0.5)
    randomise_lora_b(model)
    input_ids = torch.randint(0, 128, (2, 16))
    model.eval()
    assert torch.equal(logits(model, input_ids), logits(model, input_ids))
    model.train()
    assert max_diff(logits(model, input_ids), logits(model, input_ids)) > 1e-4


def test_unknown_target_module_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'qproj'.*valid target_modules are q_proj, k_proj"):
        apply_lora(make(tiny_config()), target_modules=["qproj"])
    with pytest.raises(ConfigError, match="'lm_head'"):
        apply_lora(make(tiny_config()), target_modules=["lm_head"])


def test_applying_lora_twice_and_disabling_without_lora_are_errors() -> None:
    model = apply_lora(make(tiny_config()))
    with pytest.raises(ConfigError, match="already has LoRA layers"):
        apply_lora(model)
    with pytest.raises(ConfigError, match="has no LoRA layers"), disable_adapters(make(tiny_config())):
        pass


def test_missing_adapter_files_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="adapter_config.json does not exist"):
        load_adapter(make(tiny_config()), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": QKVO}))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors does not exist"):
        load_adapter(make(tiny_config()), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": QKVO}))
    with pytest.raises(CheckpointError, match="peft_type is 'IA3'"):
        load_adapter(make(tiny_config()), tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path: Path) -> None:
    model = apply_lora(make(tiny_config()), rank=4, target_modules="all-linear")
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    other_base = make(tiny_config(intermediate_size=48))
    with pytest.raises(CheckpointError, match=r"'base_model\.model\.model\.layers\.0\.mlp\.\w+_proj\.lora_\w\.weight'"
                       r" has shape \(\d+, \d+\) but the model expects \(\d+, \d+\)"):
        load_adapter(other_base, tmp_path)


def test_unknown_tensor_in_adapter_file_is_an_error(tmp_path: Path) -> None:
    model = apply_lora(make(tiny_config()), rank=4)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight' matches no"):
        load_adapter(make(tiny_config()), tmp_path)


def test_save_adapter_into_existing_directory_keeps_other_files(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    model = apply_lora(make(tiny_config()), rank=4)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "metrics.jsonl"
    ]


def test_merge_command_writes_a_model_transformers_loads(tmp_path: Path) -> None:
    checkpoint = pytest.importorskip("alignkit.checkpoint")
    if not hasattr(checkpoint, "save_hf_model") or not hasattr(checkpoint, "load_pretrained"):
        pytest.skip("alignkit.checkpoint.save_hf_model / load_pretrained are not available yet")
    from alignkit.cli import main

    base = make(tiny_config())
    checkpoint.save_hf_model(base, tmp_path / "base")
    adapted = apply_lora(copy.deepcopy(base), rank=4, target_modules="all-linear")
    randomise_lora_b(adapted)
    save_adapter(adapted, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))

    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    input_ids = torch.randint(0, 128, (2, 16))
    assert max_diff(logits(merged, input_ids), logits(adapted.eval(), input_ids)) <= 1e-5
