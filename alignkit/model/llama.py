"""The Llama-family decoder: pre-norm RMSNorm, SwiGLU MLP, rotary positions, MHA / MQA / GQA, explicit KV cache.

One file covers Llama 2 / 3 / 3.x, Mistral, Qwen2 / 2.5 and SmolLM2; `ModelConfig` says which pieces are on.
Parameter names are HF's (`model.layers.N.self_attn.q_proj.weight`, ...) so checkpoints and LoRA adapters move
between alignkit, `transformers` and `peft` without renaming. See docs/model.md for why each piece is there.

Shapes in comments: B batch, T new tokens, L keys (cache + new), H hidden, NH / NKV query / KV heads, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from alignkit.model.config import ModelConfig, llama3_inv_freq

# Weight dtypes by the names configs and command-line flags use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# `enable_gqa` appeared in torch 2.5.
_SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in fp32 whatever the activation dtype (as HF does, for parity)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm computes x * rsqrt(mean(x^2) + eps) as HF's composite does, bit for bit (tested), in one call
        # instead of five: a decode step runs 2 norms per layer on a few rows, where the calls are the cost. For a
        # bf16 / fp16 input it does the statistics and the product in fp32 and rounds once at the end, as HF's
        # x.float() ... .to(dtype) does (values and gradients identical, tested), without those two extra calls.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class KVCache:
    """Keys and values of every layer for up to `max_length` tokens, preallocated so decoding never reallocates.

    `length` counts the tokens already written. A forward with a cache writes its T new tokens at
    [length, length + T) in every layer, then advances `length` once at the end.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        assert config.head_dim is not None
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.max_length = max_length
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, NKV, T, D] after the cached tokens; return all keys and values so far [B, NKV, L, D]."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(
                f"KV cache holds {self.max_length} tokens; writing {k.shape[2]} more after {self.length} "
                "overflows it. Create the cache with a larger max_length."
            )
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def repeat_interleave(self, n: int) -> None:
        """Give each sequence n copies (n samples per prompt share one prefill)."""
        self.keys = [k.repeat_interleave(n, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(n, dim=0) for v in self.values]

    def select(self, index: torch.Tensor) -> None:
        """Keep only the sequences at `index` (drop finished ones so later steps do less work)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in HF's (non-interleaved) layout, where the two halves of the head dim form the complex
    pairs: x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1). `sin` comes from `LlamaModel.rope`
    with its first half negated, so rotate_half is a swap of the halves (one roll, no negation, no cat): the same
    products, bit for bit, in 4 calls instead of 7."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        assert config.head_dim is not None
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_proj_bias)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [B, T, heads * D]. Generation swaps in one fused matmul per instance
        (`alignkit.generation.packed`); the parameters stay the three HF-named projections."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H]
        cos: torch.Tensor,  # [B, 1, T, D]
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # bool [B, 1, T, L], True = may attend; None = plain causal
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # [B, NKV, L, D]
        groups = self.num_heads // self.num_kv_heads
        if groups > 1 and seq == 1:
            # GQA decoding (one new token): query head h uses KV head h // groups, so the groups of one KV head
            # become its "query positions": [B, NH, 1, D] -> [B, NKV, groups, D]. Exact (one query sees the same
            # keys either way) and copy-free, unlike expanding the whole cache to NH heads at every step.
            y = F.scaled_dot_product_attention(q.reshape(batch, self.num_kv_heads, groups, self.head_dim), k, v,
                                               attn_mask=mask)
            y = y.reshape(batch, 1, self.num_heads * self.head_dim)
            return self.o_proj(y)
        if groups > 1 and _SDPA_HAS_GQA and q.device.type == "cpu":
            # The CPU kernels share KV heads natively: no [B, NH, L, D] copy of the keys and values.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1,
                                               enable_gqa=True)
        else:
            if groups > 1:
                # An explicit expand keeps every CUDA SDPA backend available (not all of them take enable_gqa).
                k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, self.num_heads, -1, self.head_dim)
                v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, self.num_heads, -1, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1)
        y = y.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020, https://arxiv.org/abs/2002.05202): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache):  # type: ignore[no-untyped-def]
        # Pre-norm: the residual stream is never normalised, only each branch's input.
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_attention_mask(
    *,
    batch: int,
    seq: int,
    past: int,
    device: torch.device,
    attention_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None,
) -> torch.Tensor | None:
    """Boolean [B, 1, T, L] mask (True = attend), or None when plain causal attention is exact.

    Query i sits at absolute position past + i; it may see key j when j <= past + i, key j is not padding
    (`attention_mask`, length L), and both belong to the same document (`document_ids`, packed rows).
    Every query may always see itself, so a padding query never has an all-masked row (which gives NaN).
    A 4-D boolean `attention_mask` [B, 1, T, L] is already the whole mask (e.g. pairs sharing their prompt,
    `alignkit.data.shared_prompt_collate`) and is used as given.
    """
    total = past + seq
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool or attention_mask.shape != (batch, 1, seq, total):
            raise ValueError(
                f"a 4-D attention_mask must be bool [batch, 1, new tokens, cached + new tokens] = "
                f"{(batch, 1, seq, total)}; got {attention_mask.dtype} {tuple(attention_mask.shape)}."
            )
        if document_ids is not None:
            raise ValueError("a 4-D attention_mask already holds the document structure; pass no document_ids.")
        return attention_mask
    if attention_mask is None and document_ids is None:
        if past == 0 or seq == 1:
            return None  # causal within the new tokens, all of the cache visible
    query_pos = torch.arange(past, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None]  # [1, 1, T, L]
    if attention_mask is not None:
        if attention_mask.shape != (batch, total):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected [batch, cached + new tokens] "
                f"= {(batch, total)}."
            )
        mask = mask & attention_mask.bool()[:, None, None, :]
    if document_ids is not None:
        if past:
            raise ValueError("document_ids (packed sequences) cannot be combined with a KV cache.")
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    mask = mask | (key_pos == query_pos)[None, None]
    return mask.expand(batch, 1, seq, total)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask as SDPA uses it: 0 where True, -inf where False, in the queries' dtype. SDPA converts a
    boolean mask this way at every call; converting once per forward gives the same values (so the same outputs,
    bit for bit, tested) without one conversion per layer, a few percent of a CPU decode step's time outside the
    matmuls."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every document boundary of a packed row: [B, T] -> [B, T]."""
    batch, seq = document_ids.shape
    idx = torch.arange(seq, device=document_ids.device).expand(batch, seq)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm: tokens [B, T] -> hidden states [B, T, H]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing: bool | str = False  # False, True (every activation) or "selective"
        self._inv_freq = self._rope_inv_freq(config)  # fp32, kept out of state_dict and out of .to(dtype)

    @staticmethod
    def _rope_inv_freq(config: ModelConfig) -> torch.Tensor:
        assert config.head_dim is not None
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaling = config.rope_scaling
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                inv_freq = llama3_inv_freq(inv_freq, scaling)
            elif kind == "linear":
                inv_freq = inv_freq / scaling["factor"]
        return inv_freq

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, D] for integer positions [B, T], computed in fp32 then cast; the first half of sin is
        negated, the form `apply_rope` takes."""
        if self._inv_freq.device != position_ids.device:
            self._inv_freq = self._inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self._inv_freq  # [B, T, D/2]
        cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        batch, seq = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + seq > self.config.max_position_embeddings:
            raise ValueError(
                f"{past + seq} tokens exceed the model's context window of "
                f"{self.config.max_position_embeddings} (max_position_embeddings); shorten the input."
            )
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 4:
                raise ValueError("a 4-D attention_mask needs explicit position_ids (they cannot be inferred).")
            if document_ids is not None:
                position_ids = positions_from_documents(document_ids)
            elif attention_mask is not None:
                # Left padding: real tokens count from 0 after the pads.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(batch, seq)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        mask = build_attention_mask(
            batch=batch, seq=seq, past=past, device=input_ids.device,
            attention_mask=attention_mask, document_ids=document_ids,
        )
        if mask is not None and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            mask = additive_mask(mask, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing == "selective" and self.training:
                x = checkpoint(_without_autocast_cache, layer, x, cos, sin, mask, kv_cache, use_reentrant=False,
                               context_fn=_selective_checkpoint_contexts)
            elif self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(seq)
        return self.norm(x)


# Selective activation checkpointing keeps what is costly to recompute, the outputs of the matmuls and of attention
# and the dtype casts (under autocast, the bf16 copies of the weights: casting them again is a pass over the
# weights), and recomputes the rest of a layer (norms, RoPE, SiLU, products, residual adds) in backward.
_SAVED_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention", "_to_copy")
    if hasattr(torch.ops.aten, name)
)


def _saved_or_recomputed(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_checkpoint_contexts() -> tuple[object, object]:
    return create_selective_checkpoint_contexts(_saved_or_recomputed)


def _without_autocast_cache(layer: nn.Module, *args: object) -> torch.Tensor:
    """Run `layer` with autocast's weight-cast cache off. Selective checkpointing replays a layer's ops one for one
    in backward; a cast served from the cache in forward (a second forward of the same weights in one autocast
    region) but run again in the replay would break that count. A layer uses each weight once, so nothing is lost."""
    cached = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        return layer(*args)
    finally:
        torch.set_autocast_cache_enabled(cached)


class PreTrainedMixin:
    """What causal-LM and scalar-head models share: init, parameter counts, dtype/device."""

    config: ModelConfig

    def init_weights(self) -> None:
        """The one place that initialises weights (for training from scratch).

        - Linear and embedding weights: N(0, initializer_range), HF's default (0.02).
        - Residual-branch outputs (o_proj, down_proj): additionally scaled by 1/sqrt(2 * num_layers), GPT-2's
          scheme, so the residual stream's variance does not grow with depth at init.
        - Biases: zero. RMSNorm weights: one. Scalar (score) head: N(0, 1/sqrt(hidden + 1)) as in TRL.
        """
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():  # type: ignore[attr-defined]
            if isinstance(module, nn.Linear):
                if name.endswith("score"):
                    nn.init.normal_(module.weight, std=1 / math.sqrt(self.config.hidden_size + 1))
                else:
                    is_residual = name.endswith(("o_proj", "down_proj"))
                    nn.init.normal_(module.weight, std=residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device  # type: ignore[attr-defined]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype  # type: ignore[attr-defined]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # type: ignore[attr-defined]

    def set_gradient_checkpointing(self, enabled: bool | str = True) -> None:
        """Recompute each layer's activations in backward instead of storing them (memory for compute): True keeps
        only each layer's input; "selective" also keeps the outputs of its matmuls and attention and recomputes
        only the cheap element-wise work."""
        if enabled not in (True, False, "selective"):
            raise ValueError(f"gradient checkpointing is True, False or 'selective'; got {enabled!r}.")
        self.model.gradient_checkpointing = enabled  # type: ignore[attr-defined]


class LlamaForCausalLM(PreTrainedMixin, nn.Module):
    """Decoder plus LM head: `model(input_ids)` -> logits [B, T, V]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_mask: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits [B, T, V]; or [N, V] for the N positions where `logits_mask` [B, T] is True (row-major);
        or [N, V] at the flat positions `logits_index` [N] into the B * T positions (repeats allowed);
        or [B, k, V] for the last k positions when `logits_to_keep` = k > 0.

        Computing logits only where a loss or a sample needs them saves the LM head's share of the FLOPs
        (for SmolLM2-135M the head is ~28M of its 135M parameters) and the [B, T, V] activation.
        """
        hidden = self.model(
            input_ids, position_ids=position_ids, attention_mask=attention_mask,
            document_ids=document_ids, kv_cache=kv_cache,
        )
        if logits_mask is not None:
            hidden = hidden[logits_mask]
        elif logits_index is not None:
            hidden = hidden.flatten(0, 1)[logits_index]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)


class LlamaForScore(PreTrainedMixin, nn.Module):
    """Decoder plus a scalar head on each token's final hidden state: reward models and PPO critics.

    Stored like HF's `LlamaForSequenceClassification` with `num_labels=1` (`score.weight` [1, H], no bias),
    so an exported reward model also loads in `transformers`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token scalars [B, T]."""
        hidden = self.model(
            input_ids, position_ids=position_ids, attention_mask=attention_mask, document_ids=document_ids
        )
        return self.score(hidden).squeeze(-1)
