"""Few-shot scoring on CUDA: the cached prefix, packed rows and 4-D masks give the CPU's log-likelihoods (fp32)
and greedy flags, in bf16 close to them."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.eval.loglikelihood import score_requests
from tests.eval.test_loglikelihood import random_requests
from tests.gpu.helpers import GPU, gpu_config
from tests.model.test_llama import make

pytestmark = GPU


def _check_scores_match_cpu(device: str) -> None:
    model = make(gpu_config())
    twin = copy.deepcopy(model).to(device)
    requests = random_requests(5, shots=40, num_items=12, vocab=256)
    on_cpu = score_requests(model, requests, batch_size=5)
    on_device = score_requests(twin, requests, batch_size=5)
    for a, b in zip(on_cpu, on_device):
        for x, y in zip(a, b):
            assert y.logprob == pytest.approx(x.logprob, abs=1e-4)
            assert y.is_greedy == x.is_greedy
    in_bf16 = score_requests(twin.to(torch.bfloat16), requests, batch_size=5)
    for a, b in zip(on_cpu, in_bf16):
        for x, y in zip(a, b):
            assert y.logprob == pytest.approx(x.logprob, abs=0.1 * x.num_tokens)


def test_scores_on_cuda_match_cpu() -> None:
    _check_scores_match_cpu("cuda")
