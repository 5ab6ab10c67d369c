"""token_logprobs / entropy / per-sequence sums against plain formulas and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import (
    entropy_from_logits,
    segment_ids_from_mask,
    sequence_lengths,
    sequence_logprobs,
    token_logprobs,
)
from alignkit.losses import logprobs as logprobs_module

LN3 = math.log(3.0)


def naive_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def test_docstring_example() -> None:
    logits = torch.tensor([[0.0, LN3], [0.0, LN3]])
    out = token_logprobs(logits, torch.tensor([1, 0]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([math.log(0.75), math.log(0.25)]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out, torch.tensor([-0.287682, -1.386294]), atol=1e-6, rtol=0)


def test_matches_log_softmax_gather_fp32_and_3d() -> None:
    logits = torch.randn(2, 5, 50) * 4
    labels = torch.randint(0, 50, (2, 5))
    out = token_logprobs(logits, labels)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out.double(), naive_logprobs(logits, labels), atol=1e-5, rtol=0)


def test_bf16_input_is_exact_for_its_values_and_close_to_fp32() -> None:
    logits32 = torch.randn(64, 300) * 5
    labels = torch.randint(0, 300, (64,))
    logits16 = logits32.bfloat16()
    out = token_logprobs(logits16, labels)
    assert out.dtype == torch.float32
    # Computed in fp32 from the bf16 values: matches an fp64 reference on those same values to fp32 precision...
    torch.testing.assert_close(out.double(), naive_logprobs(logits16.double(), labels), atol=1e-5, rtol=0)
    # ...and differs from the fp32 logits only by bf16's rounding of the inputs (8 mantissa bits, |z| <~ 20).
    assert (out.double() - naive_logprobs(logits32, labels)).abs().max() < 0.2
    # Whereas a bf16 log_softmax rounds the *result* too; ours is never worse than that.
    bf16_naive = torch.log_softmax(logits16, -1).gather(-1, labels[:, None]).squeeze(-1).double()
    ref = naive_logprobs(logits16.double(), labels)
    assert (out.double() - ref).abs().max() <= (bf16_naive - ref).abs().max()


def test_gradient_matches_autograd_of_log_softmax() -> None:
    logits = (torch.randn(7, 11, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, 11, (7,))
    torch.autograd.gradcheck(lambda z: token_logprobs(z, labels), (logits,))
    weights = torch.randn(7, dtype=torch.float64)
    (token_logprobs(logits, labels) * weights).sum().backward()
    expected = torch.autograd.grad((naive_logprobs(logits, labels) * weights).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, expected, atol=1e-12, rtol=0)


def test_chunking_and_bf16_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force several chunks (3 rows each) to exercise the chunk loop in forward and backward.
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", 3 * 40)
    logits32 = torch.randn(10, 40) * 3
    labels = torch.randint(0, 40, (10,))
    logits16 = logits32.bfloat16().requires_grad_()
    token_logprobs(logits16, labels).sum().backward()
    assert logits16.grad is not None and logits16.grad.dtype == torch.bfloat16
    ref_logits = logits16.detach().double().requires_grad_()
    naive_logprobs(ref_logits, labels).sum().backward()
    torch.testing.assert_close(logits16.grad.double(), ref_logits.grad, atol=4e-3, rtol=1e-2)
    torch.testing.assert_close(
        token_logprobs(logits32, labels).double(), naive_logprobs(logits32, labels), atol=1e-5, rtol=0
    )


def test_ignore_index_gives_zero_and_no_gradient() -> None:
    logits = torch.randn(2, 3, 6, requires_grad=True)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 5]])
    out = token_logprobs(logits, labels)
    assert out[0, 1] == 0 and out[1, 0] == 0 and out[1, 1] == 0
    assert out[0, 0] < 0
    out.sum().backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[0, 1] == 0) and torch.all(logits.grad[1, :2] == 0)
    assert logits.grad[0, 0].abs().sum() > 0


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="must share every dimension"):
        token_logprobs(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))


def test_entropy_docstring_values_and_plain_formula() -> None:
    out = entropy_from_logits(torch.tensor([[0.0, 0.0], [0.0, LN3]]))
    torch.testing.assert_close(out, torch.tensor([math.log(2), 0.562335]), atol=1e-6, rtol=0)
    logits = torch.randn(3, 4, 17)
    probs = torch.softmax(logits.double(), -1)
    expected = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits).double(), expected, atol=1e-5, rtol=0)
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32


def test_segment_ids_and_sequence_sums_docstring_example() -> None:
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    segment_ids = segment_ids_from_mask(mask)
    assert segment_ids.tolist() == [0, 0, 1]
    token_logps = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    sums = sequence_logprobs(token_logps, segment_ids, 3)
    assert sums.tolist() == [-3.0, -0.5, 0.0]
    assert sequence_lengths(segment_ids, 3).tolist() == [2, 1, 0]
    (sums * torch.tensor([1.0, 10.0, 100.0])).sum().backward()
    assert token_logps.grad is not None and token_logps.grad.tolist() == [1.0, 1.0, 10.0]


def test_flattened_response_logprobs_equal_padded_masked_sum() -> None:
    """The logits_mask path ([N, V] + segment sums) equals the padded [B, T, V] path with ignore_index."""
    logits = torch.randn(3, 6, 20)
    labels = torch.randint(0, 20, (3, 6))
    mask = torch.rand(3, 6) > 0.4
    mask[2] = False  # one sequence without response tokens
    padded = token_logprobs(logits, labels.masked_fill(~mask, -100)).sum(-1)
    flat = token_logprobs(logits[mask], labels[mask])
    segment_ids = segment_ids_from_mask(mask)
    torch.testing.assert_close(sequence_logprobs(flat, segment_ids, 3), padded, atol=1e-6, rtol=0)
    assert sequence_lengths(segment_ids, 3).tolist() == mask.sum(-1).tolist()


@pytest.mark.gpu
def test_cuda_bf16_memory_stays_near_the_logits_size() -> None:
    """On a GPU, forward + backward through token_logprobs on bf16 [N, V] logits needs about one extra bf16 [N, V]
    (the gradient) plus a small fp32 chunk, where autograd through log_softmax(logits.float()) keeps fp32 copies
    (measured on an H100: 1.06x vs 6.0x the logits' bytes at N=8192, V=128256)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    num_tokens, vocab = 8192, 65536  # 1 GiB of bf16 logits; the fp32 chunk is 64 MiB of it
    logits_bytes = num_tokens * vocab * 2

    values = (torch.randn(num_tokens, vocab, device="cuda") * 3).bfloat16()
    labels = torch.randint(0, vocab, (num_tokens,), device="cuda")

    def peak_extra(fn: object) -> tuple[int, torch.Tensor]:
        logits = values.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(logits, labels)  # type: ignore[operator]
        out.sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out.detach().double()

    ours_peak, ours = peak_extra(token_logprobs)
    naive_peak, naive = peak_extra(
        lambda z, y: torch.log_softmax(z.float(), -1).gather(-1, y[:, None]).squeeze(-1)
    )
    torch.testing.assert_close(ours, naive, atol=1e-4, rtol=0)
    assert ours_peak < 1.3 * logits_bytes, ours_peak / logits_bytes
    assert naive_peak > 2.5 * logits_bytes, naive_peak / logits_bytes
