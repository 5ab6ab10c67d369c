"""The Llama-family decoder, its config, KV cache and scalar head."""

from alignkit.model.config import ConfigError, ModelConfig
from alignkit.model.llama import DTYPES, KVCache, LlamaForCausalLM, LlamaForScore, LlamaModel

__all__ = ["DTYPES", "ConfigError", "KVCache", "LlamaForCausalLM", "LlamaForScore", "LlamaModel", "ModelConfig"]
