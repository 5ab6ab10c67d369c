"""Tiny checkpoints written independently of alignkit's loaders: GGUF files built with `gguf.GGUFWriter`."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from alignkit.model import LlamaForCausalLM, ModelConfig

# HF parameter suffix -> GGUF tensor suffix (llama.cpp's names, written out here rather than imported).
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute): HF rotary halves -> GGML pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def random_k_quant_blocks(rows: int, cols: int, qtype: gguf.GGMLQuantizationType, seed: int = 0) -> np.ndarray:
    """Random Q4_K / Q6_K blocks with small, finite f16 scales (the gguf package cannot quantise to K-quants)."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin (f16) lead the 144-byte block
        data[:, :, 0:4] = np.array([0.01, 0.005], dtype=np.float16).view(np.uint8)
    elif qtype == gguf.GGMLQuantizationType.Q6_K:  # d (f16) ends the 210-byte block
        data[:, :, 208:210] = np.array([0.001], dtype=np.float16).view(np.uint8)
    else:
        raise ValueError(qtype)
    return data.reshape(rows, -1)


def write_gguf(
    model: LlamaForCausalLM,
    path: Path,
    *,
    qtypes: dict[str, gguf.GGMLQuantizationType] | None = None,
    arch: str = "llama",
    extra_tensors: dict[str, np.ndarray] | None = None,
    skip: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp would (q/k permuted); `qtypes` maps GGUF names to a quantisation (default F32).

    Returns the raw stored arrays by GGUF name (quantised bytes for quantised tensors).
    """
    config: ModelConfig = model.config
    qtypes = qtypes or {}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    stored: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        gname = gguf_name(name)
        if gname in skip:
            continue
        array = tensor.detach().float().numpy().copy()
        if gname.endswith("attn_q.weight"):
            array = llama_cpp_permute(array, config.num_heads, config.num_heads)
        elif gname.endswith("attn_k.weight"):
            array = llama_cpp_permute(array, config.num_heads, config.num_kv_heads)
        qtype = qtypes.get(gname, gguf.GGMLQuantizationType.F32)
        if qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K):
            data = random_k_quant_blocks(*array.shape, qtype)
        else:
            data = gguf.quants.quantize(array, qtype)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, data)
        else:
            writer.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qtype)
        stored[gname] = data
    for gname, data in (extra_tensors or {}).items():
        writer.add_tensor(gname, data)
        stored[gname] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def make_model(config: ModelConfig) -> LlamaForCausalLM:
    """Random weights with non-trivial norms and biases, so parity cannot pass by accident."""
    model = LlamaForCausalLM(config)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "bias")):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()
