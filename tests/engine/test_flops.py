"""Model FLOPs and MFU: the matmul FLOPs match torch's own FlopCounterMode exactly (forward, full fine-tuning,
LoRA, a model that trains only its top), and attention pairs match a brute-force count over the model's mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from alignkit.engine.flops import FlopCounter, attention_pairs, datasheet_peak, peak_flops
from alignkit.model.llama import build_attention_mask
from alignkit.model.lora import apply_lora
from tests.engine.helpers import run, tiny_model

WIDTH = 4 * 8  # tiny_model: 4 heads of 8


def counted(model: torch.nn.Module, *, train: bool, **kwargs: object) -> tuple[float, float]:
    """(our FLOPs, torch's matmul FLOPs) of one forward (and backward when `train`) on a [2, 10] batch."""
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    counter = FlopCounter()
    counter.watch([model])
    with FlopCounterMode(display=False) as reference, torch.set_grad_enabled(train):
        out = model(ids, **kwargs)
        if train:
            out.float().pow(2).sum().backward()
    ours = counter.take()
    counter.close()
    matmuls = sum(v for k, v in reference.get_flop_counts()["Global"].items() if "attention" not in str(k))
    return ours, float(matmuls)


def attention_flops(pairs: float, layers_with_backward: int, num_layers: int = 2) -> float:
    return pairs * 4 * WIDTH * (num_layers + 2 * layers_with_backward)


CAUSAL_PAIRS = 2 * 10 * 11 / 2  # two rows of 10 tokens


def test_counts_for_forward_full_lora_and_top_layer_training() -> None:
    # Forward only: every matmul once, attention once.
    ours, matmuls = counted(tiny_model(), train=False)
    assert ours == matmuls + attention_flops(CAUSAL_PAIRS, 0)
    # Full fine-tuning: every matmul of forward and backward, and attention x3 in both layers.
    ours, matmuls = counted(tiny_model(), train=True)
    assert ours == matmuls + attention_flops(CAUSAL_PAIRS, 2)
    # LoRA on every projection: frozen base weights get no weight gradient, layer 0's q/k/v no input gradient.
    model = tiny_model()
    model.requires_grad_(False)
    apply_lora(model, rank=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    ours, matmuls = counted(model, train=True)
    assert ours == matmuls + attention_flops(CAUSAL_PAIRS, 2)
    # Only the last layer and the head train: no backward through layer 0 at all.
    model = tiny_model()
    model.requires_grad_(False)
    model.model.layers[1].requires_grad_(True)
    ours, matmuls = counted(model, train=True)
    assert ours == matmuls + attention_flops(CAUSAL_PAIRS, 1)


def test_logits_only_where_asked() -> None:
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 6:] = True
    ours, matmuls = counted(tiny_model(), train=False, logits_mask=mask)
    assert ours == matmuls + attention_flops(CAUSAL_PAIRS, 0)
    full, _ = counted(tiny_model(), train=False)
    assert full - ours == 2 * 32 * 64 * 12  # 12 positions fewer through the 32 x 64 head


def brute_force_pairs(batch: int, seq: int, past: int, attention_mask: torch.Tensor | None,
                      document_ids: torch.Tensor | None) -> int:
    """Pairs the model's own mask allows, between real queries and real keys."""
    mask = build_attention_mask(batch=batch, seq=seq, past=past, device=torch.device("cpu"),
                                attention_mask=attention_mask, document_ids=document_ids)
    if mask is None:
        mask = torch.ones(batch, 1, seq, past + seq, dtype=torch.bool).tril(past)
    if attention_mask is not None and attention_mask.dim() == 2:
        real = attention_mask.bool()
        mask = mask & real[:, None, past:, None] & real[:, None, None, :]
    return int(mask.sum())


def test_attention_pairs_match_the_models_mask() -> None:
    right = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    left = right.flip(-1)
    docs = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    cache_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    cases = [
        (2, 6, 0, None, None),
        (2, 6, 0, right, None),
        (2, 6, 0, left, None),
        (2, 6, 0, None, docs),
        (2, 1, 6, cache_mask, None),  # one decode step over six cached tokens
        (2, 1, 6, None, None),
    ]
    for batch, seq, past, mask, documents in cases:
        assert float(attention_pairs(batch, seq, past, mask, documents)) == brute_force_pairs(
            batch, seq, past, mask, documents)
    four_d = build_attention_mask(batch=2, seq=6, past=0, device=torch.device("cpu"), attention_mask=None,
                                  document_ids=docs)
    assert float(attention_pairs(2, 6, 0, four_d, None)) == float(attention_pairs(2, 6, 0, None, docs))


def test_peak_from_datasheet_or_probe() -> None:
    assert datasheet_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert datasheet_peak("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert datasheet_peak("NVIDIA H200", torch.float32) == 67e12
    assert datasheet_peak("Some Future GPU", torch.bfloat16) is None
    probed = peak_flops(torch.device("cpu"), "fp32")
    assert 1e9 < probed < 1e15
    assert peak_flops(torch.device("cpu"), "fp32") == probed  # measured once per process


def test_engine_logs_mfu_from_counted_flops(tmp_path: Path) -> None:
    engine, rows = run(tmp_path, total_steps=3)
    for row in rows:
        assert row["tflops"] > 0
        # train.peak_flops = 1e12 in the helper: MFU (%) = 100 x model FLOP/s / peak.
        assert row["mfu"] == pytest.approx(100 * row["tflops"] * 1e12 / 1e12)
    assert engine.flops.take() == 0.0  # the counter was read at every log and closed at the end
