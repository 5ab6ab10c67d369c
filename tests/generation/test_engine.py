"""The generation engine: parity with `transformers` greedy decoding, log-probs, sampling, n samples, stops."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from alignkit.errors import UserError
from alignkit.generation import Completion, SamplingParams, generate
from alignkit.generation.packed import packed_linears, packing_available
from alignkit.model import LlamaForCausalLM
from alignkit.tokenizer import Tokenizer
from tests.conftest import tiny_config
from tests.model.test_llama import hf_twin, make

transformers = pytest.importorskip("transformers")

PROMPT_LENGTHS = (5, 11, 8, 3)


def prompts_of(lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=generator).tolist() for n in lengths]


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def char_tokenizer(eos_id: int = 0) -> Tokenizer:
    """One token per character; id `eos_id` is <|endoftext|>, the other ids below 128 printable characters."""
    chars = [chr(c) for c in range(32, 127)] + [chr(c) for c in range(161, 161 + 32)]
    ids = [i for i in range(128) if i != eos_id]
    vocab = {"<|endoftext|>": eos_id, **{ch: i for ch, i in zip(chars, ids)}}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, eos_token="<|endoftext|>")


class ForwardRecorder:
    """Records (batch, new tokens) of every forward call of a model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls.append(tuple(args[0].shape))  # type: ignore[arg-type]


@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_greedy_matches_transformers_with_left_padding_and_eos(num_kv_heads: int) -> None:
    model = make(tiny_config(num_kv_heads=num_kv_heads))
    hf = hf_twin(model)
    prompts = prompts_of(PROMPT_LENGTHS)
    # Pick as EOS a token that one row produces early, so some rows stop before max_new_tokens and others don't.
    free = generate(model, prompts, SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[]))
    eos = next(t for c in free for t in c.token_ids[3:8] if sum(t in d.token_ids for d in free) < len(free))
    ours = generate(model, prompts, SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[eos]))

    ids, mask = left_pad(prompts)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    reasons = {c.finish_reason for c in ours}
    assert reasons == {"stop", "length"}, "the test needs rows that stop early and rows that do not"
    for completion, row in zip(ours, theirs.tolist()):
        assert completion.token_ids == row[: len(completion.token_ids)]
        if completion.finish_reason == "stop":
            assert completion.token_ids[-1] == eos and eos not in completion.token_ids[:-1]
        else:
            assert len(completion.token_ids) == 20 and eos not in completion.token_ids


def test_repetition_penalty_greedy_matches_transformers() -> None:
    model = make(tiny_config())
    hf = hf_twin(model)
    prompts = prompts_of((9, 9, 9))  # equal lengths: HF would also penalise pad tokens in padded rows
    ours = generate(model, prompts, SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1.5,
                                                   stop_token_ids=[]))
    with torch.no_grad():
        theirs = hf.generate(input_ids=torch.tensor(prompts), max_new_tokens=20, do_sample=False,
                             repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)[:, 9:]
    assert [c.token_ids for c in ours] == theirs.tolist()
    plain = generate(model, prompts, SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[]))
    assert [c.token_ids for c in plain] != [c.token_ids for c in ours]  # the penalty changed something


def full_forward_logits(model: LlamaForCausalLM, prompt: list[int], completion: Completion) -> torch.Tensor:
    """Logits [len(completion), V] predicting each completion token, from one unpadded forward without cache."""
    ids = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        logits = model(ids)[0]
    return logits[len(prompt) - 1 : -1]


def test_logprobs_equal_full_forward_and_processed_distribution() -> None:
    model = make(tiny_config())
    prompts = prompts_of(PROMPT_LENGTHS)
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_k=10, n=2, seed=3, stop_token_ids=[])
    completions = generate(model, prompts, params)
    assert len(completions) == len(prompts) * 2
    for completion in completions:
        logits = full_forward_logits(model, prompts[completion.prompt_index], completion)
        tokens = torch.tensor(completion.token_ids)
        raw = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(completion.raw_logprobs), raw, atol=1e-5)
        # The sampling distribution, recomputed plainly: divide by T, keep the 10 largest, renormalise.
        scaled = logits / 0.7
        kth = scaled.sort(-1, descending=True).values[:, 9:10]
        filtered = torch.where(scaled >= kth, scaled, torch.full_like(scaled, float("-inf")))
        processed = filtered.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(completion.logprobs), processed, atol=1e-5)
        assert all(lp > raw_lp for lp, raw_lp in zip(completion.logprobs, completion.raw_logprobs))


def test_min_new_tokens_masks_the_stop_tokens_until_then() -> None:
    """Half the first 128 ids stop a sequence: without min_new_tokens most end within 4 tokens; with 5 (HF's rule),
    the first 5 tokens are never stop tokens, and their sampling log-probs are those of the distribution without
    the stop tokens (the raw ones stay the model's)."""
    model = make(tiny_config())
    prompts = prompts_of(PROMPT_LENGTHS)
    stops = list(range(0, 128, 2))
    free = generate(model, prompts, SamplingParams(max_new_tokens=8, n=4, seed=5, stop_token_ids=stops))
    assert sum(len(c.token_ids) < 5 for c in free) > len(free) // 2
    held = generate(model, prompts, SamplingParams(max_new_tokens=8, n=4, seed=5, stop_token_ids=stops,
                                                   min_new_tokens=5))
    for completion in held:
        assert len(completion.token_ids) >= 6 and not set(completion.token_ids[:5]) & set(stops)
        logits = full_forward_logits(model, prompts[completion.prompt_index], completion)
        masked = logits.clone()
        masked[:5, stops] = float("-inf")
        tokens = torch.tensor(completion.token_ids)
        expected = masked.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-5)
        raw = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(completion.raw_logprobs), raw, atol=1e-5)
    with pytest.raises(UserError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5)


def test_greedy_logprobs_are_zero_and_raw_logprobs_exact() -> None:
    model = make(tiny_config())
    prompts = prompts_of((4, 7))
    for completion in generate(model, prompts, SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[])):
        assert completion.logprobs == [0.0] * 6
        logits = full_forward_logits(model, prompts[completion.prompt_index], completion)
        assert completion.token_ids == logits.argmax(-1).tolist()
        raw = logits.log_softmax(-1).max(-1).values
        assert torch.allclose(torch.tensor(completion.raw_logprobs), raw, atol=1e-5)


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    model = make(tiny_config())
    prompts = prompts_of(PROMPT_LENGTHS)

    def run(seed: int) -> list[list[int]]:
        params = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=seed, stop_token_ids=[])
        return [c.token_ids for c in generate(model, prompts, params)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    torch.manual_seed(5)
    unseeded = [c.token_ids for c in generate(model, prompts, SamplingParams(max_new_tokens=10, stop_token_ids=[]))]
    torch.manual_seed(5)
    assert unseeded == [c.token_ids for c in generate(model, prompts, SamplingParams(max_new_tokens=10,
                                                                                      stop_token_ids=[]))]


def test_n_samples_share_one_prefill_and_greedy_samples_are_identical() -> None:
    model = make(tiny_config())
    prompts = prompts_of((6, 9))
    recorder = ForwardRecorder(model)
    sampled = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=0,
                                                      stop_token_ids=[]))
    recorder.handle.remove()
    # One prefill of the 2 prompts (9 columns after padding), then 7 decode steps of the 6 rows.
    assert recorder.calls == [(2, 9)] + [(6, 1)] * 7
    assert [c.prompt_index for c in sampled] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(c.token_ids) for c in sampled[:3]}) > 1  # samples of one prompt differ

    greedy_n = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0, n=3, stop_token_ids=[]))
    greedy_1 = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[]))
    for i, completion in enumerate(greedy_n):
        assert completion.token_ids == greedy_1[i // 3].token_ids
        assert completion.raw_logprobs == pytest.approx(greedy_1[i // 3].raw_logprobs, abs=1e-6)


def test_finished_rows_leave_the_batch_and_batched_equals_one_by_one() -> None:
    model = make(tiny_config())
    prompts = prompts_of(PROMPT_LENGTHS)
    free = generate(model, prompts, SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[]))
    eos = free[0].token_ids[2]
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[eos])
    recorder = ForwardRecorder(model)
    batched = generate(model, prompts, params)
    recorder.handle.remove()
    stop_steps = sorted(len(c.token_ids) for c in batched if c.finish_reason == "stop")
    assert stop_steps and stop_steps[0] <= 3
    # Decode call k (k = 1, 2, ...) feeds the token sampled at step k; rows that stopped by then are gone.
    decode_batches = [batch for batch, seq in recorder.calls if seq == 1]
    expected = [sum(1 for c in batched if len(c.token_ids) > k) for k in range(1, len(decode_batches) + 1)]
    assert decode_batches == expected
    assert decode_batches[-1] < len(prompts)
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], params)[0]
        assert alone.token_ids == batched[i].token_ids
        assert alone.finish_reason == batched[i].finish_reason
        assert alone.raw_logprobs == pytest.approx(batched[i].raw_logprobs, abs=1e-5)


def test_stop_strings_cut_text_and_tokens() -> None:
    tokenizer = char_tokenizer()
    model = make(tiny_config())
    prompts = [tokenizer.encode("Hello, world"), tokenizer.encode("abc")]
    free = generate(model, prompts, SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[]),
                    tokenizer=tokenizer)
    text = free[0].text
    assert text is not None and len(text) == 20  # one character per token
    stop = text[5:7]  # a two-character stop string that spans two tokens
    first = text.find(stop)
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[], stop_strings=[stop, "\x7f\x7f"])
    out = generate(model, prompts, params, tokenizer=tokenizer)
    assert out[0].finish_reason == "stop"
    assert out[0].text == text[:first]
    # Token ids end with the token that completed the stop string; log-probs are cut the same way.
    assert out[0].token_ids == free[0].token_ids[: first + 2]
    assert len(out[0].logprobs) == len(out[0].raw_logprobs) == first + 2
    if stop not in (free[1].text or ""):
        assert out[1].finish_reason == "length" and out[1].text == free[1].text


def test_tokenizer_stop_ids_are_the_default_and_eos_is_kept() -> None:
    model = make(tiny_config())
    prompt = [5, 6, 7]
    free = generate(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[]))[0]
    eos = free.token_ids[2]
    tokenizer = char_tokenizer(eos_id=eos)
    assert tokenizer.stop_token_ids == [eos]
    out = generate(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0), tokenizer=tokenizer)[0]
    end = free.token_ids.index(eos) + 1
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[:end]  # EOS included, as in transformers
    assert out.text == tokenizer.decode(free.token_ids[: end - 1]) and len(out.text) == end - 1


def test_context_window_limits_new_tokens_and_long_prompts_fail() -> None:
    model = make(tiny_config(max_position_embeddings=16))
    prompts = [[1] * 5, [2] * 14]
    out = generate(model, prompts, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[]))
    # The longest prompt (14) leaves 2 positions; the last sampled token needs none: 3 new tokens.
    assert [len(c.token_ids) for c in out] == [3, 3]
    assert {c.finish_reason for c in out} == {"length"}
    with pytest.raises(UserError, match=r"prompt 1 has 17 tokens, more than the model's context window of 16"):
        generate(model, [[1] * 3, [1] * 17], SamplingParams(max_new_tokens=1))
    with pytest.raises(UserError, match="prompt 0 contains token id 128"):
        generate(model, [[128]], SamplingParams(max_new_tokens=1))


def test_train_mode_is_restored_and_no_grad_is_recorded() -> None:
    model = make(tiny_config()).train()
    out = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=3, stop_token_ids=[]))
    assert model.training and len(out[0].token_ids) == 3


@pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed linear")
def test_packed_linears_match_plain_linears_and_are_removed() -> None:
    model = make(tiny_config(attention_bias=True, o_proj_bias=True))
    ids = torch.randint(0, 128, (3, 7))
    with torch.inference_mode():
        plain = model(ids)
        with packed_linears(model, batch_size=3) as active:
            packed = model(ids)
            assert active and "forward" in vars(model.lm_head)
            # q/k/v and gate/up run as one fused matmul each; down_proj and o_proj alone.
            layer = model.model.layers[0]
            assert "project_qkv" in vars(layer.self_attn) and "forward" in vars(layer.mlp)
            assert "forward" not in vars(layer.self_attn.q_proj) and "forward" in vars(layer.mlp.down_proj)
    assert "forward" not in vars(model.lm_head)
    assert not any({"forward", "project_qkv"} & set(vars(m)) for m in model.modules())
    assert torch.allclose(plain, packed, atol=1e-5)
    prompts = prompts_of(PROMPT_LENGTHS)
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[])
    assert [c.token_ids for c in generate(model, prompts, params)] == [
        c.token_ids for c in generate(model, prompts, params, pack_weights=False)
    ]


@pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed linear")
def test_generate_calls_inside_a_packed_block_reuse_its_weights_and_refuse_stale_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = make(tiny_config())
    prompts = prompts_of(PROMPT_LENGTHS)
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[])
    expected = [c.token_ids for c in generate(model, prompts, params)]
    reorders = []
    reorder = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", lambda *a: reorders.append(1) or reorder(*a))
    with packed_linears(model, batch_size=len(prompts)):
        packed_once = len(reorders)
        assert packed_once > 0
        for _ in range(3):
            assert [c.token_ids for c in generate(model, prompts, params)] == expected
        assert len(reorders) == packed_once  # the calls found the model packed: nothing packed again
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(2)  # an in-place update (an optimizer step)
        with pytest.raises(RuntimeError, match="stale"):
            generate(model, prompts, params)
    assert not any({"forward", "project_qkv"} & set(vars(m)) for m in model.modules())
    changed = [c.token_ids for c in generate(model, prompts, params)]  # packs the updated weights
    assert changed == [c.token_ids for c in generate(model, prompts, params, pack_weights=False)]
