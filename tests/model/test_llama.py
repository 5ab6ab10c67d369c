"""Model parity with `transformers` and the invariants of the cache and packing."""

from __future__ import annotations

import pytest
import torch

from alignkit.model import KVCache, LlamaForCausalLM, LlamaForScore, ModelConfig
from alignkit.rewards.scoring import last_token_rewards
from tests.conftest import tiny_config

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
VARIANTS = {
    "mha": dict(num_kv_heads=4),
    "mqa": dict(num_kv_heads=1),
    "gqa": dict(num_kv_heads=2),
    "qkv_bias_qwen2": dict(num_kv_heads=2, model_type="qwen2", attention_bias=True),
    "llama_all_bias": dict(attention_bias=True, o_proj_bias=True, mlp_bias=True),
    "tied": dict(tie_word_embeddings=True),
    "llama3_rope": dict(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0),
    "mistral": dict(model_type="mistral"),
    "explicit_head_dim": dict(head_dim=16),
}


def hf_twin(model: LlamaForCausalLM) -> torch.nn.Module:
    """The same weights in a `transformers` model built from our exported config."""
    hf_config = transformers.AutoConfig.for_model(**model.config.to_hf())
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    result = hf.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"}
    return hf


def make(config: ModelConfig) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config)
    model.init_weights()
    with torch.no_grad():  # non-trivial norms and biases, so parity cannot pass by accident
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "bias")):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant: str) -> None:
    model = make(tiny_config(**VARIANTS[variant]))
    hf = hf_twin(model)
    input_ids = torch.randint(0, 128, (2, 100))  # longer than original_max_position_embeddings above
    with torch.no_grad():
        ours = model(input_ids)
        theirs = hf(input_ids).logits
    assert ours.shape == (2, 100, 128)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_left_padded_batch_matches_transformers() -> None:
    model = make(tiny_config())
    hf = hf_twin(model)
    input_ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        ours = model(input_ids, attention_mask=mask)
        theirs = hf(input_ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(ours).all()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_converted_once_gives_the_boolean_masks_outputs_bit_for_bit(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A masked forward converts the boolean mask to SDPA's additive form once (`additive_mask`); every layer then
    gets the values SDPA would have made from the boolean mask, so the logits are identical, padding and
    gradients included."""
    import alignkit.model.llama as llama

    model = make(tiny_config(num_kv_heads=2)).to(dtype)
    input_ids = torch.randint(0, 128, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :2] = 0

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        logits = model(input_ids, attention_mask=mask)
        (logits.float() * torch.linspace(-1, 1, 128)).sum().backward()
        return logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    calls: list[torch.Tensor] = []
    real_additive = llama.additive_mask
    monkeypatch.setattr(llama, "additive_mask", lambda m, d: calls.append(m) or real_additive(m, d))
    converted = run()
    assert len(calls) == 1  # once per forward, not per layer
    monkeypatch.setattr(llama, "additive_mask", lambda m, d: m)  # the boolean mask reaches SDPA as before
    boolean = run()
    assert torch.equal(converted[0], boolean[0]) and torch.equal(converted[1], boolean[1])
    assert torch.isfinite(converted[0]).all()


def test_kv_cache_decoding_equals_full_forward() -> None:
    model = make(tiny_config())
    input_ids = torch.randint(0, 128, (3, 20))
    with torch.no_grad():
        full = model(input_ids)
        cache = KVCache(model.config, batch_size=3, max_length=32)
        steps = [model(input_ids[:, :8], kv_cache=cache)]
        for t in range(8, 20):
            steps.append(model(input_ids[:, t : t + 1], kv_cache=cache))
    assert cache.length == 20
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_kv_cache_with_left_padding_equals_unpadded_forward() -> None:
    model = make(tiny_config())
    short = torch.randint(0, 128, (1, 6))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 6])
    nxt = torch.randint(0, 128, (1, 1))
    with torch.no_grad():
        reference = model(torch.cat([short, nxt], dim=1))[:, -1]
        cache = KVCache(model.config, batch_size=1, max_length=16)
        model(padded, attention_mask=mask, kv_cache=cache)
        step = model(nxt, attention_mask=torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1), kv_cache=cache)
    assert torch.allclose(step[:, -1], reference, atol=1e-5)


def test_packed_documents_equal_separate_forwards() -> None:
    model = make(tiny_config())
    docs = [torch.randint(0, 128, (n,)) for n in (5, 9, 3)]
    packed = torch.cat(docs)[None]
    document_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        logits = model(packed, document_ids=document_ids)[0]
        separate = torch.cat([model(d[None])[0] for d in docs])
    assert torch.allclose(logits, separate, atol=1e-5)


def test_logits_mask_and_logits_to_keep_select_positions() -> None:
    model = make(tiny_config())
    input_ids = torch.randint(0, 128, (2, 10))
    select = torch.zeros(2, 10, dtype=torch.bool)
    select[0, 3] = select[1, 7] = select[1, 9] = True
    with torch.no_grad():
        full = model(input_ids)
        picked = model(input_ids, logits_mask=select)
        last = model(input_ids, logits_to_keep=2)
    assert picked.shape == (3, 128)
    assert torch.allclose(picked, full[select], atol=1e-6)
    assert torch.allclose(last, full[:, -2:], atol=1e-6)


def test_context_window_overflow_is_a_clear_error() -> None:
    model = make(tiny_config(max_position_embeddings=16))
    with pytest.raises(ValueError, match="context window of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_score_model_reads_last_real_token() -> None:
    config = tiny_config()
    model = LlamaForScore(config)
    model.init_weights()
    model.eval()
    ids = torch.randint(0, 128, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    with torch.no_grad():
        scores = last_token_rewards(model, ids, mask)
        alone = model(ids[1:, :5])[0, -1]
    assert scores.shape == (2,)
    assert torch.allclose(scores[1], alone, atol=1e-5)


def test_attention_kind_and_kv_bytes() -> None:
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims: 2 * 30 * 3 * 64 * 2 bytes = 23,040 bytes per token in bf16.
    smol = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                       num_kv_heads=3, tie_word_embeddings=True)
    assert smol.kv_cache_bytes_per_token(2) == 23040
    assert smol.attention_kind.startswith("grouped-query")
    assert smol.num_parameters() == 134_515_008
    assert tiny_config(num_kv_heads=1).attention_kind.startswith("multi-query")
    assert tiny_config(num_kv_heads=4).attention_kind.startswith("multi-head")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_and_rope_are_hf_composites_bit_for_bit(dtype: torch.dtype) -> None:
    """RMSNorm (one F.rms_norm call) and RoPE (a roll with a pre-negated sin) give exactly the values and gradients
    of HF's composites: the fp32 statistics of LlamaRMSNorm, and x * cos + rotate_half(x) * sin."""
    from alignkit.model.llama import LlamaModel, RMSNorm, apply_rope

    def hf_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.add_(torch.randn(48).to(dtype) * 0.3)
    x = (torch.randn(3, 5, 48) * 4).to(dtype)
    grad = torch.randn(3, 5, 48).to(dtype)
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_w = norm.weight.detach().clone().requires_grad_()
    ours, ref = norm(ours_x), hf_norm(ref_x, ref_w, 1e-5)
    assert torch.equal(ours, ref)
    (ours * grad).sum().backward()
    (ref * grad).sum().backward()
    assert torch.equal(ours_x.grad, ref_x.grad) and torch.equal(norm.weight.grad, ref_w.grad)

    model = LlamaModel(tiny_config())
    positions = torch.tensor([[0, 1, 2, 7, 300], [5, 6, 9, 10, 11]])
    cos, sin = model.rope(positions, dtype)
    inv_freq = model._inv_freq
    emb = torch.cat([positions[..., None].float() * inv_freq] * 2, dim=-1)[:, None]
    hf_cos, hf_sin = emb.cos().to(dtype), emb.sin().to(dtype)
    assert torch.equal(cos, hf_cos)
    q = torch.randn(2, 4, 5, cos.shape[-1]).to(dtype)
    ours_q, ref_q = q.clone().requires_grad_(), q.clone().requires_grad_()
    ours, ref = apply_rope(ours_q, cos, sin), ref_q * hf_cos + rotate_half(ref_q) * hf_sin
    assert torch.equal(ours, ref)
    grad = torch.randn_like(ref)
    (ours * grad).sum().backward()
    (ref * grad).sum().backward()
    assert torch.equal(ours_q.grad, ref_q.grad)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpointing_full_and_selective_give_the_plain_gradients(precision: str) -> None:
    """Full and selective activation checkpointing change what backward stores, not the gradients: equal to the
    un-checkpointed ones bit for bit. Full checkpointing runs every matmul of the layers again in backward;
    selective runs none again (the FLOPs of the plain run)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    base = make(tiny_config(num_kv_heads=2))
    ids = torch.randint(0, base.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the attention path with a mask

    def grads(mode: bool | str, forwards: int = 1) -> tuple[list[torch.Tensor], int]:
        model = copy.deepcopy(base).train()
        model.set_gradient_checkpointing(mode)
        with FlopCounterMode(display=False) as flops:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = sum(model(ids.roll(i, 0), attention_mask=mask.roll(i, 0)).float().square().mean()
                           for i in range(forwards))
            loss.backward()
        return [p.grad for p in model.parameters()], flops.get_total_flops()

    plain, plain_flops = grads(False)
    full, full_flops = grads(True)
    selective, selective_flops = grads("selective")
    for a, b, c in zip(plain, full, selective, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert selective_flops == plain_flops < full_flops

    # Two forwards of the same weights in one autocast region: autocast's cached weight casts would break the
    # op-for-op replay of selective checkpointing, so its layers cast without the cache. The gradients agree to
    # rounding: with the cache both forwards' bf16 weight gradients are summed in bf16, without it in fp32.
    plain, _ = grads(False, forwards=2)
    selective, _ = grads("selective", forwards=2)
    for a, c in zip(plain, selective, strict=True):
        assert torch.equal(a, c) if precision == "fp32" else torch.allclose(a, c, rtol=2e-2, atol=1e-6)
    with pytest.raises(ValueError, match="True, False or 'selective'"):
        base.set_gradient_checkpointing("sometimes")  # type: ignore[arg-type]
