"""The Llama model on CUDA: fp32 logits equal the CPU's and `transformers`' on the GPU (plain, left padded,
packed documents), bf16 stays close to fp32, and fp32 gradients equal the CPU's."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.losses.lm import causal_lm_loss
from alignkit.model import LlamaForCausalLM
from tests.gpu.helpers import GPU, gpu_config, max_abs_diff
from tests.model.test_llama import hf_twin, make

pytestmark = GPU
transformers = pytest.importorskip("transformers")


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three rows of 40 tokens; a left-padding mask (7 and 20 pads) and packed document ids (3, 2 and 1 documents)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 256, (3, 40), generator=g)
    attention_mask = torch.ones(3, 40, dtype=torch.long)
    attention_mask[1, :7] = 0
    attention_mask[2, :20] = 0
    document_ids = torch.zeros(3, 40, dtype=torch.long)
    document_ids[0, 11:] = 1
    document_ids[0, 29:] = 2
    document_ids[1, 25:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "document_ids": document_ids}


def _check_forward_matches_cpu(device: str) -> None:
    model = make(gpu_config())
    twin = copy.deepcopy(model).to(device)
    data = inputs()
    ids = data["input_ids"]
    with torch.no_grad():
        for extra in ({}, {"attention_mask": data["attention_mask"]}, {"document_ids": data["document_ids"]}):
            on_cpu = model(ids, **extra)
            on_device = twin(ids.to(device), **{k: v.to(device) for k, v in extra.items()})
            assert on_device.device.type == torch.device(device).type
            assert torch.isfinite(on_device).all()
            assert max_abs_diff(on_device, on_cpu) < 1e-4, sorted(extra)
        # Packed rows on the device equal separate forwards of each document on the device.
        packed = twin(ids.to(device), document_ids=data["document_ids"].to(device))[0]
        bounds = [0, 11, 29, 40]
        separate = torch.cat([twin(ids[:1, a:b].to(device))[0] for a, b in zip(bounds, bounds[1:])])
        assert max_abs_diff(packed, separate) < 1e-4


def _check_forward_matches_transformers(device: str) -> None:
    model = make(gpu_config())
    ours = copy.deepcopy(model).to(device)
    theirs = hf_twin(model).to(device)
    data = {k: v.to(device) for k, v in inputs(1).items()}
    ids, mask = data["input_ids"], data["attention_mask"]
    with torch.no_grad():
        assert max_abs_diff(ours(ids), theirs(ids).logits) < 1e-4
        real = mask.bool()
        assert max_abs_diff(ours(ids, attention_mask=mask)[real], theirs(ids, attention_mask=mask).logits[real]) < 1e-4


def _check_bf16_close_to_fp32(device: str) -> dict[str, float]:
    """bf16 weights (the generation path) and bf16 autocast over fp32 weights (the training path) against fp32."""
    model = make(gpu_config()).to(device)
    ids = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        reference = model(ids)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            autocast = model(ids)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)(ids)
    assert autocast.dtype == bf16.dtype == torch.bfloat16
    scale = reference.abs().mean().item()
    numbers = {}
    for name, out in (("autocast", autocast), ("bf16", bf16)):
        out = out.float()
        assert torch.isfinite(out).all()
        numbers[f"{name}_rel_mean_abs_diff"] = (out - reference).abs().mean().item() / scale
        numbers[f"{name}_argmax_agreement"] = (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
    # bf16 keeps 8 significant bits. Measured on a CPU (same model, 1024 tokens): mean |diff| / mean |logit| 0.004
    # (autocast) and 0.007 (bf16 weights); the top token agreed at 98.4% and 97.6% of positions.
    assert numbers["autocast_rel_mean_abs_diff"] < 0.02 and numbers["bf16_rel_mean_abs_diff"] < 0.02, numbers
    assert numbers["autocast_argmax_agreement"] > 0.95 and numbers["bf16_argmax_agreement"] > 0.95, numbers
    return numbers


def lm_step_loss(model: LlamaForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The trainers' loss: logits only at the target positions (`logits_mask`), summed NLL / target count."""
    targets = labels != -100
    logits = model(input_ids, logits_mask=targets)
    loss, _ = causal_lm_loss(logits, labels[targets], num_tokens=int(targets.sum()))
    return loss


def _check_gradients_match_cpu(device: str, *, gradient_checkpointing: bool | str) -> None:
    model = make(gpu_config()).train()
    twin = copy.deepcopy(model).to(device).train()
    twin.set_gradient_checkpointing(gradient_checkpointing)
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 256, (4, 48), generator=g)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = -100
    labels[0, :10] = -100  # a prompt that carries no loss
    labels[2, 30:] = -100  # right padding
    cpu_loss = lm_step_loss(model, input_ids, labels)
    cpu_loss.backward()
    device_loss = lm_step_loss(twin, input_ids.to(device), labels.to(device))
    device_loss.backward()
    assert device_loss.item() == pytest.approx(cpu_loss.item(), rel=1e-5)
    device_grads = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        grad, other = param.grad, device_grads[name].grad
        assert grad is not None and other is not None, name
        rel = (other.cpu() - grad).norm().item() / max(grad.norm().item(), 1e-12)
        assert rel < 1e-4, (name, rel)


def test_fp32_forward_on_cuda_equals_cpu_with_padding_and_packing() -> None:
    _check_forward_matches_cpu("cuda")


def test_fp32_forward_on_cuda_equals_transformers_on_cuda() -> None:
    _check_forward_matches_transformers("cuda")


def test_bf16_on_cuda_stays_close_to_fp32() -> None:
    print(_check_bf16_close_to_fp32("cuda"))


@pytest.mark.parametrize("gradient_checkpointing", [False, True, "selective"], ids=["plain", "checkpointed", "selective"])
def test_fp32_gradients_on_cuda_equal_cpu(gradient_checkpointing: bool | str) -> None:
    _check_gradients_match_cpu("cuda", gradient_checkpointing=gradient_checkpointing)
