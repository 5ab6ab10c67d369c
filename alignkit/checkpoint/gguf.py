"""Import llama.cpp GGUF files (architecture "llama": Llama 2/3, Mistral, SmolLM2, ...) into `LlamaForCausalLM`.

Every tensor is dequantised to float with the `gguf` package (F32, F16, BF16, Q4_0, Q4_1, Q5_x, Q8_0 and the
K-quants), so the result is an ordinary full-precision model: quantisation error is kept, the storage format is not.

Two layout differences from HF checkpoints are undone here:
- GGUF lists dimensions fastest-first, so a torch weight [out, in] is stored with shape [in, out]; the `gguf`
  reader already returns numpy arrays in torch order, which we check against the config.
- llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of attn_q / attn_k so
  that the two elements of each rotary pair are adjacent (GGML's interleaved RoPE); HF rotates the two halves of
  each head instead. `_unpermute` is the inverse of that permutation.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from alignkit.checkpoint.hf import assign_state
from alignkit.errors import CheckpointError, ConfigError
from alignkit.model.config import ModelConfig, llama3_inv_freq
from alignkit.model.llama import LlamaForCausalLM

if TYPE_CHECKING:
    import gguf

    from alignkit.tokenizer import Tokenizer

_MISSING = object()

# GGUF tensor name -> HF parameter name. Per-layer names are under "blk.N.".
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
# llama.cpp stores Llama 3.1 / 3.2 rope scaling as a precomputed per-frequency divisor tensor, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor, or None when alignkit's Llama has no such parameter."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """A memory-mapped reader; nothing is dequantised until a tensor's data is touched."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file.")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError / struct.error / IndexError on bad or truncated files
        raise CheckpointError(
            f"{path}: cannot read this GGUF file ({type(e).__name__}: {e}); it is truncated, corrupt or not GGUF. "
            "Re-download it."
        ) from e


def _field(reader: gguf.GGUFReader, key: str, default: Any = _MISSING, *, source: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"{source}: metadata key {key!r} is missing; the GGUF file is incomplete.")
        return default
    return field.contents()


def gguf_config(reader: gguf.GGUFReader, *, source: str) -> ModelConfig:
    """The ModelConfig that a GGUF file's metadata (and tensor list, for biases and tying) describes."""
    arch = _field(reader, "general.architecture", source=source)
    if arch != "llama":
        raise CheckpointError(
            f"{source}: GGUF architecture {arch!r} is not supported; alignkit imports GGUF files with "
            "general.architecture 'llama' (Llama, Mistral, SmolLM2). Use the model's HF safetensors checkpoint."
        )

    def meta(key: str, default: Any = _MISSING) -> Any:
        return _field(reader, f"llama.{key}", default, source=source)

    names = {t.name for t in reader.tensors}
    hidden = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // num_heads))
    rope_dim = int(meta("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(
            f"{source}: partial rotary embeddings (rope.dimension_count {rope_dim} < head dim {head_dim}) are not "
            "supported."
        )
    vocab = meta("vocab_size", None)
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise CheckpointError(f"{source}: tensor 'token_embd.weight' is missing.")
        vocab = int(embd.shape[-1])
    rope_theta = float(meta("rope.freq_base", 10000.0))
    rope_scaling = _rope_scaling(reader, meta, rope_theta, head_dim, source)
    layer0 = "blk.0."
    try:
        config = ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(meta("feed_forward_length")),
            num_layers=int(meta("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            max_position_embeddings=int(meta("context_length", 4096)),
            rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings="output.weight" not in names,
            attention_bias=f"{layer0}attn_q.bias" in names,
            o_proj_bias=f"{layer0}attn_output.bias" in names,
            mlp_bias=f"{layer0}ffn_up.bias" in names,
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None, source=source),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", None, source=source),
            pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", None, source=source),
            model_type="llama",
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e
    return config


def _rope_scaling(
    reader: gguf.GGUFReader, meta: Any, rope_theta: float, head_dim: int, source: str
) -> dict[str, Any] | None:
    kind = meta("rope.scaling.type", None)
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    if kind not in (None, "none"):
        raise CheckpointError(f"{source}: rope scaling type {kind!r} is not supported (alignkit: linear, llama3).")
    freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if freqs is None:
        return None
    # llama.cpp divides each rotary frequency by rope_freqs[i]. Recover the Llama 3 parameters that produce
    # those divisors: the published checkpoints use low/high factors 1/4 and an 8192-token original context.
    import gguf

    divisors = torch.from_numpy(gguf.quants.dequantize(freqs.data, freqs.tensor_type).astype(np.float32).copy())
    base = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0, 64.0):
        for original in (8192, 4096, 2048, 16384):
            scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": original}
            if torch.allclose(base / llama3_inv_freq(base, scaling), divisors.flatten(), rtol=1e-3):
                return scaling
    raise CheckpointError(
        f"{source}: tensor {_ROPE_FREQS!r} holds rotary frequency factors that match no Llama 3 rope scaling "
        "alignkit knows; convert the model from its HF checkpoint instead."
    )


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute(w, n_head, n_head_kv)` on the rows of a q/k weight [heads * D, ...] or bias.

    llama.cpp: w.reshape(heads, 2, D // 2, ...).swapaxes(1, 2), turning HF's "first half / second half" rotary
    layout into interleaved pairs; the inverse reshapes as (heads, D // 2, 2, ...) and swaps back.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def dequantize(tensor: Any, *, source: str) -> torch.Tensor:
    """A GGUF reader tensor as a float32 torch tensor in torch's dimension order."""
    import gguf

    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(
            f"{source}: tensor {tensor.name!r} uses quantisation {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantise; use a file quantised as F32/F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q*_K."
        ) from e
    # GGUF shapes list the fastest-varying dimension first; torch lists it last.
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    array = np.asarray(array, dtype=np.float32)
    if array.size != math.prod(shape):
        raise CheckpointError(
            f"{source}: tensor {tensor.name!r} holds {array.size} values but its header says shape {list(shape)}; "
            "the file is corrupt. Re-download it."
        )
    return torch.from_numpy(array.reshape(shape).copy() if not array.flags.writeable else array.reshape(shape))


def quantization_summary(reader: gguf.GGUFReader) -> str:
    """E.g. "Q4_1 x210, F32 x61, Q8_0 x1"."""
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def load_gguf_model(
    path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    reader: gguf.GGUFReader | None = None,
) -> LlamaForCausalLM:
    """Only the model of a GGUF file (see `load_gguf`)."""
    source = str(path)
    reader = reader if reader is not None else open_gguf(path)
    config = gguf_config(reader, source=source)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue  # folded into config.rope_scaling above
        name = hf_name(tensor.name)
        if name is None or name not in expected:
            raise CheckpointError(
                f"{source}: unexpected tensor {tensor.name!r}; a llama-architecture model with this metadata has "
                "no such parameter, so alignkit cannot import this file faithfully."
            )
        weight = dequantize(tensor, source=source)
        want = tuple(expected[name].shape)
        if tuple(weight.shape) != want:
            raise CheckpointError(
                f"{source}: tensor {tensor.name!r} ({name}) has shape {list(weight.shape)}, expected {list(want)} "
                "from the file's metadata."
            )
        if ".attn_q." in tensor.name:
            weight = _unpermute(weight, config.num_heads)
        elif ".attn_k." in tensor.name:
            weight = _unpermute(weight, config.num_kv_heads)
        state[name] = weight.to(dtype=dtype, device=device)
    missing = [n for n in expected if n not in state]
    if missing:
        raise CheckpointError(
            f"{source}: tensor for {missing[0]!r} is missing"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; the GGUF file is incomplete."
        )
    assign_state(model, state, device)
    return model


def load_gguf(
    path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[LlamaForCausalLM, Tokenizer | None]:
    """`(model, tokenizer)` from a llama.cpp GGUF file; tokenizer is None when the file carries none."""
    reader = open_gguf(path)
    model = load_gguf_model(path, dtype=dtype, device=device, reader=reader)
    tokenizer = None
    if "tokenizer.ggml.tokens" in reader.fields:
        from alignkit.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf(reader, source=str(path))
    return model, tokenizer
