"""HF safetensors checkpoints: parity with transformers both ways, exact round trips, sharding, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import alignkit.checkpoint.hf as hf_module
from alignkit.checkpoint import load_hf_model, save_hf_model
from alignkit.errors import CheckpointError
from alignkit.model import LlamaForCausalLM, LlamaForScore
from tests.checkpoint.helpers import make_model
from tests.conftest import tiny_config

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "untied_gqa": dict(num_kv_heads=2),
    "tied_mha": dict(num_kv_heads=4, tie_word_embeddings=True),
    "mqa": dict(num_kv_heads=1),
    "qwen2_biases": dict(model_type="qwen2", attention_bias=True),
    "llama_all_biases": dict(attention_bias=True, o_proj_bias=True, mlp_bias=True),
}


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_model_loads_in_transformers_with_same_logits(tmp_path: Path, variant: str) -> None:
    model = make_model(tiny_config(**VARIANTS[variant]))
    save_hf_model(model, tmp_path / "out")
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert ("lm_head.weight" in stored) is (not model.config.tie_word_embeddings)  # HF omits a tied head
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["untied_gqa", "tied_mha", "qwen2_biases"])
def test_load_save_load_is_bit_identical(tmp_path: Path, variant: str) -> None:
    model = make_model(tiny_config(**VARIANTS[variant]))
    save_hf_model(model, tmp_path / "a")
    first = load_hf_model(tmp_path / "a")
    save_hf_model(first, tmp_path / "b")
    second = load_hf_model(tmp_path / "b")
    assert_same_state(model, first)
    assert_same_state(first, second)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    if model.config.tie_word_embeddings:
        assert second.lm_head.weight is second.model.embed_tokens.weight


def test_dtype_on_save_and_on_load(tmp_path: Path) -> None:
    model = make_model(tiny_config())
    save_hf_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "bf16" / "model.safetensors").values())
    as_bf16 = load_hf_model(tmp_path / "bf16", dtype=None)
    assert as_bf16.dtype == torch.bfloat16
    as_fp32 = load_hf_model(tmp_path / "bf16")  # default float32: bf16 values widened exactly
    for name, p in model.state_dict().items():
        assert torch.equal(as_fp32.state_dict()[name], p.to(torch.bfloat16).float()), name


def test_sharded_save_loads_back_and_in_transformers(tmp_path: Path) -> None:
    model = make_model(tiny_config())
    files = save_hf_model(model, tmp_path / "sharded", max_shard_bytes=20_000)
    names = {p.name for p in files}
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    shards = sorted(n for n in names if n.startswith("model-"))
    assert len(shards) > 3 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.state_dict().values())
    loaded = load_hf_model(tmp_path / "sharded")
    assert_same_state(model, loaded)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    ids = torch.randint(0, 128, (1, 11))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_score_model_matches_transformers_sequence_classification(tmp_path: Path) -> None:
    config = tiny_config(pad_token_id=0)  # HF finds the last real token through pad_token_id
    model = LlamaForScore(config)
    model.init_weights()
    model.eval()
    save_hf_model(model, tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"] and saved["num_labels"] == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids = torch.randint(1, 128, (2, 9))  # no pad tokens: HF scores the last position
    with torch.no_grad():
        ours = model(ids)[:, -1]
        theirs = hf(ids).logits.squeeze(-1)
    assert (ours - theirs).abs().max().item() <= 1e-5
    loaded = load_hf_model(tmp_path / "rm", kind="score")
    assert isinstance(loaded, LlamaForScore)
    assert_same_state(model, loaded)


def test_model_saved_by_transformers_loads_with_same_logits(tmp_path: Path) -> None:
    hf_config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf_model(tmp_path / "hf")
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_loading_never_random_initialises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_hf_model(make_model(tiny_config()), tmp_path / "m")
    real_init = torch.nn.init.kaiming_uniform_
    touched: list[torch.Tensor] = []

    def spy(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if not tensor.is_meta:
            touched.append(tensor)
        return real_init(tensor, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)
    load_hf_model(tmp_path / "m")
    assert touched == []  # nn.Linear's default init only ever ran on meta tensors


def test_generation_config_and_tokenizer_are_written(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from alignkit.tokenizer import Tokenizer

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a"))
    backend.add_special_tokens(["<s>", "</s>"])
    tok = Tokenizer(backend, bos_token="<s>", eos_token="</s>")
    model = make_model(tiny_config(bos_token_id=0, eos_token_id=1))
    files = save_hf_model(model, tmp_path / "m", tokenizer=tok)
    assert {"tokenizer.json", "generation_config.json"} <= {p.name for p in files}
    gen = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (0, 1)
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "m").eos_token_id == 1


# ------------------------------------------------------------------------------------------- atomic saving


def test_save_replaces_a_model_dir_and_refuses_other_dirs(tmp_path: Path) -> None:
    first, second = make_model(tiny_config()), make_model(tiny_config(tie_word_embeddings=True))
    save_hf_model(first, tmp_path / "m", max_shard_bytes=20_000)  # sharded
    save_hf_model(second, tmp_path / "m")  # single file: no stale shards may survive
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    assert_same_state(second, load_hf_model(tmp_path / "m"))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary siblings left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"notes: exists, is not empty and is not a model directory"):
        save_hf_model(first, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_failed_save_leaves_previous_model_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = make_model(tiny_config())
    save_hf_model(original, tmp_path / "m")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(hf_module, "save_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        save_hf_model(make_model(tiny_config()), tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert_same_state(original, load_hf_model(tmp_path / "m"))


# ------------------------------------------------------------------------------------------------- errors


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    save_hf_model(make_model(tiny_config()), tmp_path / "m")
    return tmp_path / "m"


def rewrite_weights(directory: Path, edit: object) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)  # type: ignore[operator]
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope: no such directory"):
        load_hf_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no config\.json in this directory"):
        load_hf_model(tmp_path / "empty")


def test_unsupported_architecture(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: architecture 'GPT2LMHeadModel' is not supported"):
        load_hf_model(saved)


def test_missing_tensor_names_tensor_and_files(saved: Path) -> None:
    rewrite_weights(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing; searched "
                                              r"model\.safetensors"):
        load_hf_model(saved)


def test_missing_untied_lm_head_suggests_tying(saved: Path) -> None:
    rewrite_weights(saved, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' is missing.*tie_word_embeddings: true"):
        load_hf_model(saved)


def test_wrong_shape_names_expected_and_got(saved: Path) -> None:
    rewrite_weights(saved, lambda t: t.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \[31\], expected \[32\]"):
        load_hf_model(saved)


def test_extra_tensor_is_an_error_but_rotary_inv_freq_is_ignored(saved: Path) -> None:
    rewrite_weights(saved, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    reference = load_hf_model(saved)  # old checkpoints stored this buffer; it is recomputed from the config
    rewrite_weights(saved, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.ones(32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'.*"
                                              r"config\.json does not match"):
        load_hf_model(saved)
    assert reference.config.attention_bias is False


def test_truncated_safetensors_suggests_redownload(saved: Path) -> None:
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read.*truncated or corrupt.*Re-download"):
        load_hf_model(saved)


def test_missing_shard_named(tmp_path: Path) -> None:
    save_hf_model(make_model(tiny_config()), tmp_path / "m", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "m").glob("model-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json lists shard {shard.name}, which is missing"):
        load_hf_model(tmp_path / "m")


def test_pickle_only_directory_is_refused(saved: Path) -> None:
    (saved / "model.safetensors").rename(saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickled PyTorch weights.*only reads safetensors"):
        load_hf_model(saved)


def test_score_kind_errors(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no score head.*alignkit train rm"):
        load_hf_model(saved, kind="score")
    rm = LlamaForScore(tiny_config())
    rm.init_weights()
    save_hf_model(rm, tmp_path / "rm")
    with pytest.raises(CheckpointError, match=r"reward / score model.*kind='score'"):
        load_hf_model(tmp_path / "rm")
    # A score config whose weights lost the head: same advice.
    rewrite_weights(tmp_path / "rm", lambda t: t.pop("score.weight"))
    with pytest.raises(CheckpointError, match=r"no score head"):
        load_hf_model(tmp_path / "rm", kind="score")


def test_loaded_model_is_eval_and_trainable(saved: Path) -> None:
    model = load_hf_model(saved)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert all(p.requires_grad for p in model.parameters())
