"""Model FLOPs of what a run computes, and the machine's peak, for the logged MFU (model FLOPs utilisation).

MFU = model FLOPs done in a logging window / (window seconds x peak FLOP/s per device x devices), as torchtitan
and nanochat log it: the work the model needs, not what the hardware did (activation recomputation and padded
attention are not counted). `FlopCounter` counts each forward of the models it watches when it happens, from the
shapes and masks the forward is given, so rollouts, reference and reward forwards and evaluation count too:

- linear layers: 2 x (decoder matrix parameters) per position the forward computes (B x T, KV-cache decoding
  one position per row), LoRA adapters included;
- attention: 4 x heads x head_dim per layer per (query, key) pair the mask allows (QK^T and PV), so causal
  attention over T tokens counts T (T + 1) / 2 pairs, packed documents their own triangles, and decoding the
  cached keys it reads;
- the LM or score head: 2 x hidden x outputs per position whose logits are computed (`logits_mask`,
  `logits_index`, `logits_to_keep`), not per position of the batch;
- backward, when the forward runs with gradients on and the model has trainable parameters: walking the layers in
  forward order, each matmul's input gradient (1x its forward) where something below it still trains, each
  trainable weight's gradient (1x its forward), and the attention backward (2x its forward) in each layer whose
  queries, keys or values need a gradient. Full fine-tuning gives the familiar 6 x parameters + 12 x layers x
  heads x head_dim x pairs; LoRA about 4 x parameters, since frozen weights get no gradient; a reward model
  training its last layers, only those layers' backward. The matmul part equals what
  `torch.utils.flop_counter.FlopCounterMode` counts (tested).

The peak is the datasheet's dense figure for known GPUs in the run's precision, and on anything else (CPUs) the
best of a few square matmuls in that precision, measured once per process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from alignkit.model.llama import LlamaModel, positions_from_documents

# Dense (not sparse) peak FLOP/s per GPU from the vendors' datasheets: bf16 tensor cores, and fp32 without TF32
# (PyTorch's default for fp32 matmuls). Matched against torch.cuda.get_device_name, most specific first.
_GPU_PEAKS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756e12, 51e12),
    ("H100 NVL", 835e12, 60e12),
    ("H100", 989e12, 67e12),
    ("H200", 989e12, 67e12),
    ("GH200", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
]
_PROBED: dict[tuple[str, torch.dtype], float] = {}


def datasheet_peak(device_name: str, dtype: torch.dtype) -> float | None:
    for name, bf16, fp32 in _GPU_PEAKS:
        if name in device_name:
            return bf16 if dtype == torch.bfloat16 else fp32
    return None


def probe_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The best FLOP/s of a few square matmuls in `dtype` on `device` (cached per process)."""
    key = (str(device), dtype)
    if key not in _PROBED:
        size = 8192 if device.type == "cuda" else 2048
        # Its own generator: measuring the machine must not move the global RNG a run draws from.
        g = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
        best = float("inf")
        for _ in range(4):  # the first round warms up the kernels and the allocator
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        _PROBED[key] = 2 * size**3 / best
    return _PROBED[key]


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one device for a run in `precision` ("fp32" or "bf16")."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        found = datasheet_peak(torch.cuda.get_device_name(device), dtype)
        if found is not None:
            return found
    return probe_peak(device, dtype)


def _linear_terms(linear: nn.Linear, below: bool) -> tuple[float, float, bool]:
    """(forward FLOPs, backward FLOPs per position, whether its output needs a gradient) of one linear layer.

    `below`: something under this layer trains, so its input needs a gradient. A LoRA layer adds its adapter's
    matmuls (x A^T, then B); its B input gradient is needed whenever A trains.
    """
    rank = getattr(linear, "rank", 0) if hasattr(linear, "lora_A") else 0
    base = linear.in_features * linear.out_features
    adapter = rank * (linear.in_features + linear.out_features)
    forward = 2.0 * (base + adapter)
    backward = forward if below else 0.0  # the input gradient costs what the forward did
    trainable = [p for p in linear.parameters() if p.requires_grad and p.ndim >= 2]
    backward += 2.0 * sum(p.numel() for p in trainable)  # weight gradients
    if not below and rank and linear.lora_A.weight.requires_grad:  # type: ignore[union-attr]
        backward += 2.0 * rank * linear.out_features  # dL/d(xA^T) through B
    return forward, backward, below or bool(trainable) or any(p.requires_grad for p in linear.parameters())


class _Watched:
    """The static FLOP terms of one decoder model, walked in forward order to know which gradients backward needs."""

    def __init__(self, decoder: LlamaModel, owner: nn.Module) -> None:
        config = decoder.config
        self.num_layers = len(decoder.layers)
        self.attention_width = config.num_heads * config.head_dim
        self.forward_per_position = 0.0
        self.backward_per_position = 0.0
        self.attention_backward_layers = 0
        below = decoder.embed_tokens.weight.requires_grad

        def linears(*modules: nn.Module) -> None:
            nonlocal below
            grows = False
            for module in modules:
                forward, backward, needs = _linear_terms(module, below)  # type: ignore[arg-type]
                self.forward_per_position += forward
                self.backward_per_position += backward
                grows = grows or needs
            below = grows

        def norm(module: nn.Module) -> None:
            nonlocal below
            below = below or any(p.requires_grad for p in module.parameters())

        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norm(layer.input_layernorm)
            linears(attn.q_proj, attn.k_proj, attn.v_proj)
            self.attention_backward_layers += int(below)
            linears(attn.o_proj)
            norm(layer.post_attention_layernorm)
            linears(mlp.gate_proj, mlp.up_proj)
            linears(mlp.down_proj)
        norm(decoder.norm)
        # The head's input needs a gradient when anything in the decoder trains.
        self.head_input_grad = below
        self.trainable = any(p.requires_grad for p in owner.parameters())


class FlopCounter:
    """Counts model FLOPs of every forward of the watched models (see the module docstring); `take()` reads them."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._total = 0.0
        self._pending: list[torch.Tensor] = []  # data-dependent terms on a GPU, read at take() (no sync per forward)

    def watch(self, models: Iterable[nn.Module]) -> None:
        """Hook every Llama decoder inside `models` and the head (lm_head or score) beside it."""
        for model in models:
            for owner in model.modules():
                decoder = getattr(owner, "model", None)
                if not isinstance(decoder, LlamaModel):
                    continue
                watched = _Watched(decoder, owner)
                self._handles.append(decoder.register_forward_pre_hook(
                    lambda module, args, kwargs, w=watched: self._decoder(w, args, kwargs), with_kwargs=True))
                head = getattr(owner, "lm_head", None) or getattr(owner, "score", None)
                if isinstance(head, nn.Linear):
                    self._handles.append(head.register_forward_pre_hook(
                        lambda module, args, w=watched, h=head: self._head(w, h, args[0])))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def take(self) -> float:
        """FLOPs counted since the last call."""
        total = self._total
        if self._pending:
            total += float(torch.stack([t.to(torch.float64) for t in self._pending]).sum())
        self._total, self._pending = 0.0, []
        return total

    def _add(self, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu":
                self._total += float(value)
            else:
                self._pending.append(value.detach().clone())
        else:
            self._total += value

    def _training(self, watched: _Watched) -> bool:
        return torch.is_grad_enabled() and watched.trainable

    def _decoder(self, watched: _Watched, args: tuple, kwargs: dict[str, Any]) -> None:
        input_ids = args[0] if args else kwargs["input_ids"]
        batch, seq = input_ids.shape
        cache = kwargs.get("kv_cache")
        past = cache.length if cache is not None else 0
        pairs = attention_pairs(batch, seq, past, kwargs.get("attention_mask"), kwargs.get("document_ids"),
                                position_ids=kwargs.get("position_ids"))
        per_pair = 4.0 * watched.attention_width * watched.num_layers  # QK^T and PV in every layer
        linear = watched.forward_per_position * batch * seq
        if self._training(watched):
            linear += watched.backward_per_position * batch * seq
            # The attention backward (dQ, dK from dS; dV, dP) costs twice its forward.
            per_pair += 2 * 4.0 * watched.attention_width * watched.attention_backward_layers
        self._add(linear)
        self._add(pairs * per_pair)

    def _head(self, watched: _Watched, head: nn.Linear, hidden: torch.Tensor) -> None:
        rows = hidden.numel() // max(1, head.in_features)
        forward = 2.0 * rows * head.in_features * head.out_features
        total = forward
        if self._training(watched):
            if watched.head_input_grad:
                total += forward
            if head.weight.requires_grad:
                total += forward
        self._add(total)


def attention_pairs(batch: int, seq: int, past: int, attention_mask: torch.Tensor | None,
                    document_ids: torch.Tensor | None, *, position_ids: torch.Tensor | None = None
                    ) -> torch.Tensor | float:
    """(query, key) pairs the forward's mask allows, padding queries and keys excluded. In packed rows each token
    sees its document up to itself: position + 1 keys (the positions the batch carries, or derived here)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.sum()
    if document_ids is not None:
        positions = position_ids if position_ids is not None else positions_from_documents(document_ids)
        return (positions + 1).sum()
    if attention_mask is not None:
        real = attention_mask.long()
        # A real query sees the real keys at or before it.
        return (real.cumsum(-1)[:, past:] * real[:, past:]).sum()
    return float(batch * (seq * past + seq * (seq + 1) // 2))
