"""Pre-packed oneDNN weights for the linear layers while generating on CPU.

Decoding multiplies a handful of rows (one token per live sequence) by every weight matrix, so each step streams
all the weights through the CPU once. PyTorch's default fp32 CPU path (`F.linear` -> MKL sgemm with a transposed
operand) reaches only a fraction of the memory bandwidth at these shapes; oneDNN with the weight reordered once
into its blocked layout is about 3x faster per step (SmolLM2-135M, batch 8: ~45 ms -> ~15 ms of matmuls on two
cores). This is what `torch.compile`'s CPU "freezing" path does, without the minutes of compilation.

Packing reads every weight once (~0.2 s for 135M parameters) and holds a packed copy of the linear weights until
the `with` block ends, so peak memory during generation is about twice the weights. The swap is per instance
(`module.forward`), is undone on exit even after an error, and leaves the module's parameters untouched, so
training state and `state_dict` are never affected.

Packing once for many calls: `generate()` packs on entry and unpacks on return, so a loop of calls (an
evaluation over batches, a benchmark, a notebook) packs every time (~0.15 s for SmolLM2-135M on two cores, about
half its bf16 prefill of 8 x 65 tokens). Wrapping the loop in `with packed_linears(model, batch_size=...)` packs
once: the calls inside find the model packed and reuse it. The weights must not change inside the block; each
nested entry checks their version counters (which every in-place update bumps) and refuses stale packed weights.

Projections that read the same input are packed as one matrix: q, k and v of each attention layer
(`Attention.project_qkv`), and gate and up of each SwiGLU MLP. One larger matmul instead of three (or two) saves
the per-call overhead that dominates a decode step once the matmuls themselves are fast (~90 fewer calls per step
for a 30-layer model).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator

import torch
from torch import nn

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)

# Models packed right now, with the version stamp of their linear weights when they were packed.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, tuple[int, ...]] = weakref.WeakKeyDictionary()


def _stamp(linears: list[nn.Linear]) -> tuple[int, ...]:
    """Storage and version of every linear weight and bias: any in-place update or re-assignment changes it."""
    stamp: list[int] = []
    for module in linears:
        for tensor in (module.weight, module.bias):
            if tensor is not None:
                version = 0 if tensor.is_inference() else tensor._version
                stamp += [tensor.data_ptr(), version]
    return tuple(stamp)


def _packed_forward(packed_weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


def _pack(linears: list[nn.Linear], batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """One packed weight for linears that share their input (outputs concatenated), its bias, the split sizes."""
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                          for m in linears])
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)
    return packed, bias, [m.out_features for m in linears]


def _fused_qkv(packed: torch.Tensor, bias: torch.Tensor | None, sizes: list[int], x: torch.Tensor
               ) -> tuple[torch.Tensor, ...]:
    return tuple(_packed_forward(packed, bias, x).split(sizes, dim=-1))


def _fused_swiglu(packed: torch.Tensor, bias: torch.Tensor | None, sizes: list[int], down: nn.Module,
                  x: torch.Tensor) -> torch.Tensor:
    gate, up = _packed_forward(packed, bias, x).split(sizes, dim=-1)
    return down(torch.nn.functional.silu(gate) * up)


@functools.cache
def packing_available() -> bool:
    """True when this torch build has oneDNN's packed linear ops and they agree with `F.linear`."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        # A generator of its own: a check the first generate() runs must not move the global RNG that sampling
        # and training draw from (two runs in one process would differ).
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            weight, bias, x = torch.randn(24, 16, generator=g), torch.randn(24, generator=g), torch.randn(3, 16, generator=g)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 3)
            out = _packed_forward(packed, bias, x)
        return bool(torch.allclose(out, torch.nn.functional.linear(x, weight, bias), atol=1e-4))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@contextlib.contextmanager
def packed_linears(model: nn.Module, *, batch_size: int, enabled: bool = True) -> Iterator[bool]:
    """Run every plain `nn.Linear` of a CPU model through a pre-packed oneDNN weight inside the block.

    `batch_size` is the expected number of rows per call (oneDNN picks its blocking for it). Yields whether
    packing is active; it is not on GPU, for other dtypes, without oneDNN, or with `enabled=False`. Inside an
    active block, a nested call reuses the packed weights (after checking that they are still current).
    """
    if not isinstance(model, nn.Module):  # a stand-in model (tests, wrappers): nothing to pack
        yield False
        return
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    if model in _ACTIVE:
        if _stamp(linears) != _ACTIVE[model]:
            raise RuntimeError(
                "the model's weights changed inside a `packed_linears` block, so its packed copies are stale; "
                "update the weights outside the block (or open a new block after the update)."
            )
        yield True
        return
    active = (
        enabled
        and bool(linears)
        and all(m.weight.device.type == "cpu" and m.weight.dtype in _PACKABLE_DTYPES for m in linears)
        and packing_available()
    )
    if not active:
        yield False
        return
    from alignkit.model.llama import MLP, Attention

    # (module, attribute) pairs whose instance attribute shadows the class's method; `del` below restores them.
    patched: list[tuple[nn.Module, str]] = []
    fused: set[nn.Linear] = set()
    try:
        with torch.inference_mode():
            for module in model.modules():
                if isinstance(module, Attention) and type(module).project_qkv is Attention.project_qkv:
                    parts = [module.q_proj, module.k_proj, module.v_proj]
                    if all(type(m) is nn.Linear for m in parts):
                        module.project_qkv = functools.partial(_fused_qkv, *_pack(parts, batch_size))  # type: ignore[method-assign]
                        patched.append((module, "project_qkv"))
                        fused.update(parts)
                elif isinstance(module, MLP) and type(module).forward is MLP.forward:
                    parts = [module.gate_proj, module.up_proj]
                    if all(type(m) is nn.Linear for m in parts):
                        module.forward = functools.partial(  # type: ignore[method-assign]
                            _fused_swiglu, *_pack(parts, batch_size), module.down_proj)
                        patched.append((module, "forward"))
                        fused.update(parts)
            for module in linears:
                if module not in fused:
                    packed, bias, _ = _pack([module], batch_size)
                    module.forward = functools.partial(_packed_forward, packed, bias)  # type: ignore[method-assign]
                    patched.append((module, "forward"))
        _ACTIVE[model] = _stamp(linears)
        yield True
    finally:
        _ACTIVE.pop(model, None)
        for module, name in patched:
            delattr(module, name)
