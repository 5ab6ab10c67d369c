"""One config for the Llama family (Llama 2/3/3.x, Mistral, Qwen2/2.5, SmolLM2) and its mapping to HF `config.json`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from alignkit.errors import ConfigError

# HF `architectures` names we read and write. The decoder is the same; they differ in defaults (biases, tying).
CAUSAL_LM_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SCORE_ARCHITECTURES = {
    "LlamaForSequenceClassification": "llama",
    "MistralForSequenceClassification": "mistral",
    "Qwen2ForSequenceClassification": "qwen2",
}




@dataclass
class ModelConfig:
    """Shape and numerics of a Llama-family decoder. Field names follow HF where HF has one."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    # num_kv_heads == num_heads: multi-head; 1: multi-query; otherwise grouped-query attention.
    num_kv_heads: int = 32
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or HF's dict for rope_type "llama3" / "linear" (factor, low/high_freq_factor, original_max_position_embeddings).
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    # Biases on q/k/v projections (Qwen2) and on o_proj (rare); MLP biases (rare).
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # HF model family, used when saving `config.json`: "llama", "mistral" or "qwen2".
    model_type: str = "llama"
    # Initialisation std for weights (HF's initializer_range).
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; set head_dim."
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads} "
                "(grouped-query attention shares each KV head among num_heads / num_kv_heads query heads)."
            )

    @property
    def attention_kind(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "multi-head (MHA)"
        if self.num_kv_heads == 1:
            return "multi-query (MQA)"
        return f"grouped-query (GQA, {self.num_heads // self.num_kv_heads} query heads per KV head)"

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x bytes: the memory one cached token costs."""
        assert self.head_dim is not None
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def num_parameters(self) -> int:
        assert self.head_dim is not None
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_proj_bias:
            attn += h
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    # ---------------------------------------------------------------- HF config.json mapping

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Build from a HF `config.json` dict; `source` names the file in error messages."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type", "llama")
        known = set(CAUSAL_LM_ARCHITECTURES) | set(SCORE_ARCHITECTURES)
        if archs and archs[0] not in known:
            raise ConfigError(
                f"{source}: architecture {archs[0]!r} is not supported; alignkit loads "
                f"{', '.join(sorted(known))}. Convert the model to one of these or open an issue."
            )
        if model_type not in {"llama", "mistral", "qwen2"}:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; expected 'llama', 'mistral' or 'qwen2'."
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise ConfigError(f"{source}: required key {key!r} is missing.")
        # transformers >= 5 writes rope settings under `rope_parameters`; older files use rope_theta / rope_scaling.
        rope_params = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in {"default", "llama3", "linear"}:
                raise ConfigError(
                    f"{source}: rope scaling type {rope_type!r} is not supported; alignkit supports "
                    "'llama3' and 'linear'."
                )
            if rope_type == "default":
                rope_scaling = None
        sliding = hf.get("sliding_window")
        if hf.get("use_sliding_window", model_type == "mistral") and sliding is not None:
            if sliding < hf.get("max_position_embeddings", 0):
                raise ConfigError(
                    f"{source}: sliding-window attention (window {sliding}) is not supported; use a model "
                    "without it or set sliding_window to null if you only run sequences shorter than the window."
                )
        num_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim"),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            o_proj_bias=bool(hf.get("attention_bias", False)) and model_type == "llama",
            mlp_bias=hf.get("mlp_bias", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            model_type=model_type,
            initializer_range=hf.get("initializer_range", 0.02),
        )

    def to_hf(self, *, architecture: str | None = None, dtype: str = "float32") -> dict[str, Any]:
        """The `config.json` dict that `transformers` loads into the same model."""
        arch = architecture or {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        if self.model_type == "qwen2" and (self.attention_bias is False or self.o_proj_bias or self.mlp_bias):
            raise ConfigError("Qwen2 checkpoints always have q/k/v biases and no o_proj/MLP biases.")
        if self.model_type == "llama" and self.attention_bias != self.o_proj_bias:
            raise ConfigError(
                "HF Llama has one `attention_bias` flag for q/k/v/o together; q/k/v-only biases need model_type 'qwen2'."
            )
        hf: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "use_cache": True,
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = self.mlp_bias
            hf["pretraining_tp"] = 1
        if self.model_type in {"mistral", "qwen2"}:
            hf["sliding_window"] = None
            hf["use_sliding_window"] = False
        return hf

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:  # noqa: F821
    """Llama 3.1's RoPE frequency rescaling: keep high frequencies, divide low ones by `factor`, blend between.

    Written from the Llama 3.1 reference (`apply_scaling` in meta-llama/llama-models).
    """
    import torch

    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)
