"""The generation engine on CUDA: greedy decoding with the KV cache equals the CPU's token for token (left padding,
rows that stop early and leave the batch, repetition penalty), and seeded sampling is reproducible."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.generation import SamplingParams, generate
from tests.gpu.helpers import GPU, gpu_config
from tests.model.test_llama import make

pytestmark = GPU

PROMPT_LENGTHS = (5, 17, 9, 3)


def prompts_of(lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (n,), generator=generator).tolist() for n in lengths]


def _check_greedy_matches_cpu(device: str) -> None:
    model = make(gpu_config())
    twin = copy.deepcopy(model).to(device)
    prompts = prompts_of(PROMPT_LENGTHS)
    free = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[])
    on_cpu = generate(model, prompts, free)
    on_device = generate(twin, prompts, free)
    for a, b in zip(on_cpu, on_device):
        assert b.token_ids == a.token_ids
        assert b.raw_logprobs == pytest.approx(a.raw_logprobs, abs=1e-4)
    # A stop token that some rows produce early: finished rows leave the batch (KVCache.select on the device).
    eos = next(t for c in on_cpu for t in c.token_ids[2:8] if sum(t in d.token_ids for d in on_cpu) < len(on_cpu))
    stopping = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[eos])
    on_cpu = generate(model, prompts, stopping)
    on_device = generate(twin, prompts, stopping)
    assert {c.finish_reason for c in on_device} == {"stop", "length"}
    assert [c.token_ids for c in on_device] == [c.token_ids for c in on_cpu]
    # The repetition penalty's presence mask lives on the device too.
    penalised = SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.5, stop_token_ids=[])
    assert [c.token_ids for c in generate(twin, prompts, penalised)] == \
        [c.token_ids for c in generate(model, prompts, penalised)]


def _check_seeded_sampling(device: str) -> None:
    model = make(gpu_config()).to(device)
    prompts = prompts_of(PROMPT_LENGTHS)
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=40, top_p=0.95, n=3, seed=7, stop_token_ids=[])
    first = generate(model, prompts, params)
    again = generate(model, prompts, params)
    assert len(first) == len(prompts) * 3
    assert [c.prompt_index for c in first] == [i for i in range(len(prompts)) for _ in range(3)]
    for c in first:
        assert len(c.token_ids) == len(c.logprobs) == len(c.raw_logprobs) == 8 and c.finish_reason == "length"
        assert all(0 <= t < 256 for t in c.token_ids)
        assert all(lp <= 1e-6 for lp in c.logprobs + c.raw_logprobs)
    assert [c.token_ids for c in again] == [c.token_ids for c in first]  # same seed, same samples
    other = generate(model, prompts, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_greedy_on_cuda_equals_cpu_token_for_token() -> None:
    _check_greedy_matches_cpu("cuda")


def test_seeded_sampling_on_cuda_is_reproducible() -> None:
    _check_seeded_sampling("cuda")
