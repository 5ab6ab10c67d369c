"""GGUF import: the llama.cpp layout (reversed shapes, permuted q/k rows), dequantisation, metadata, real SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from alignkit.checkpoint import load_gguf
from alignkit.checkpoint.gguf import gguf_config, load_gguf_model, open_gguf
from alignkit.errors import CheckpointError
from alignkit.model import KVCache, LlamaForCausalLM
from alignkit.model.config import llama3_inv_freq
from tests.checkpoint.helpers import llama_cpp_permute, make_model, write_gguf
from tests.conftest import tiny_config

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("tied", [False, True])
def test_f32_gguf_round_trips_exactly(tmp_path: Path, tied: bool) -> None:
    """An F32 GGUF written the way llama.cpp writes it (q/k rows permuted) loads back to the same tensors."""
    model = make_model(tiny_config(tie_word_embeddings=tied, num_kv_heads=2))
    write_gguf(model, tmp_path / "m.gguf")
    loaded, tokenizer = load_gguf(tmp_path / "m.gguf")
    assert tokenizer is None  # the tiny file carries no tokenizer metadata
    assert loaded.config.tie_word_embeddings is tied
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    ids = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_metadata_maps_to_config(tmp_path: Path) -> None:
    model = make_model(tiny_config(num_kv_heads=1, rope_theta=500000.0, rms_norm_eps=1e-6,
                                   max_position_embeddings=512))
    write_gguf(model, tmp_path / "m.gguf")
    config = gguf_config(open_gguf(tmp_path / "m.gguf"), source="m.gguf")
    expected = model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "max_position_embeddings", "rope_theta", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(expected, key), key
    assert config.rms_norm_eps == pytest.approx(1e-6)  # stored as float32 in GGUF


def test_quantised_tensors_dequantise_and_unpermute(tmp_path: Path) -> None:
    """Each quantisation type loads as the gguf package's dequantisation of the stored blocks, q/k unpermuted.

    Hidden 256 so rows fit whole 256-element K-quant super-blocks. The check is independent of the loader:
    re-applying llama.cpp's own permutation to our q/k weights must give back the dequantised stored tensor.
    """
    config = tiny_config(hidden_size=256, intermediate_size=256, num_heads=4, num_kv_heads=2, num_layers=1)
    model = make_model(config)
    qtypes = {
        "token_embd.weight": Q.Q8_0,
        "output.weight": Q.BF16,
        "blk.0.attn_q.weight": Q.Q4_K,
        "blk.0.attn_k.weight": Q.Q4_0,
        "blk.0.attn_v.weight": Q.Q4_1,
        "blk.0.attn_output.weight": Q.Q6_K,
        "blk.0.ffn_gate.weight": Q.F16,
        "blk.0.ffn_up.weight": Q.Q8_0,
    }
    stored = write_gguf(model, tmp_path / "q.gguf", qtypes=qtypes)
    loaded = load_gguf_model(tmp_path / "q.gguf")
    params = loaded.state_dict()
    hf = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
          "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
          "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
          "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
          "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
          "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
          "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight"}
    for gname, qtype in qtypes.items():
        ours = params[hf[gname]].numpy()
        if gname.endswith("attn_q.weight"):
            ours = llama_cpp_permute(ours, 4, 4)
        elif gname.endswith("attn_k.weight"):
            ours = llama_cpp_permute(ours, 4, 2)
        reference = gguf.quants.dequantize(stored[gname], qtype).reshape(ours.shape)
        assert np.array_equal(ours, reference), gname
        assert np.isfinite(ours).all()
    # The quantisers the gguf package has stay close to the original weights (Q4_1 step ~ range / 15).
    original = model.model.layers[0].self_attn.v_proj.weight
    assert (params["model.layers.0.self_attn.v_proj.weight"] - original).abs().max() < 0.1 * original.abs().max()
    assert torch.equal(params["model.layers.0.input_layernorm.weight"], model.model.layers[0].input_layernorm.weight)


def test_llama3_rope_freqs_tensor_becomes_rope_scaling(tmp_path: Path) -> None:
    """llama.cpp stores Llama 3.1 scaling as per-frequency divisors (`rope_freqs.weight`); we recover the dict."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = tiny_config(rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=256)
    model = make_model(config)
    d = config.head_dim
    base = 1.0 / (500000.0 ** (torch.arange(0, d, 2).float() / d))
    divisors = (base / llama3_inv_freq(base, scaling)).numpy().astype(np.float32)
    write_gguf(model, tmp_path / "l3.gguf", extra_tensors={"rope_freqs.weight": divisors})
    loaded = load_gguf_model(tmp_path / "l3.gguf")
    assert loaded.config.rope_scaling == scaling
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_unsupported_architecture_names_file_and_arch(tmp_path: Path) -> None:
    model = make_model(tiny_config())
    path = tmp_path / "phi.gguf"
    write_gguf(model, path, arch="phi3")
    with pytest.raises(CheckpointError, match=r"phi\.gguf.*'phi3' is not supported"):
        load_gguf(path)


def test_missing_tensor_and_truncated_file_are_clear_errors(tmp_path: Path) -> None:
    model = make_model(tiny_config())
    write_gguf(model, tmp_path / "m.gguf", skip=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"m\.gguf.*model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_gguf(tmp_path / "m.gguf")
    write_gguf(model, tmp_path / "full.gguf")
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.gguf.*truncated, corrupt.*Re-download"):
        load_gguf(tmp_path / "cut.gguf")


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow  # parsing the real file's 49k-token vocabulary and dequantising 135M weights takes ~10 s
def test_real_smollm2_gguf_answers_paris(smollm2_gguf: str) -> None:
    model, tokenizer = load_gguf(smollm2_gguf)
    assert tokenizer is not None
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0
    assert model.num_parameters() == c.num_parameters() == 134_515_008
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True).input_ids
    cache = KVCache(c, batch_size=1, max_length=len(ids) + 8)
    step = torch.tensor([ids])
    answer: list[int] = []
    with torch.no_grad():
        for _ in range(7):
            step = model(step, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
            answer.append(int(step))
    assert "Paris" in tokenizer.decode(answer)


@pytest.mark.slow
def test_real_smollm2_gguf_logits_match_transformers(smollm2_gguf: str) -> None:
    """Same file, same token ids: our dequantise + unpermute vs transformers' GGUF loader, fp32."""
    transformers = pytest.importorskip("transformers")
    model, tokenizer = load_gguf(smollm2_gguf)
    assert tokenizer is not None
    ids = torch.tensor([tokenizer.apply_chat_template(CHAT, add_generation_prompt=True).input_ids])
    assert 25 <= ids.shape[1] <= 45
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-3


def test_gguf_is_not_loaded_as_wrong_class(tmp_path: Path) -> None:
    model = make_model(tiny_config())
    write_gguf(model, tmp_path / "m.gguf")
    assert isinstance(load_gguf_model(tmp_path / "m.gguf"), LlamaForCausalLM)
