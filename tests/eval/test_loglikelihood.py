"""Continuation log-likelihoods: lm-evaluation-harness's tokenisation, and the cached / packed / batched scorer
against a plain forward per choice (and against `transformers`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignkit.checkpoint.hf import save_hf_model
from alignkit.errors import DataError
from alignkit.eval.loglikelihood import _lines, encode_pairs, plan_rows, score_requests
from tests.eval.icl_helpers import char_tokenizer, plain_loglikelihood, tiny_model
from tests.tokenizer.helpers import tiny_tokenizer


def random_requests(seed: int, *, shots: int = 12, num_items: int = 9, vocab: int = 128) -> list:
    """Items that share a few-shot prefix, with 1-5 choices each of 1-6 tokens."""
    g = torch.Generator().manual_seed(seed)

    def tokens(low: int, high: int) -> list[int]:
        return torch.randint(1, vocab, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    prefix = tokens(shots, shots + 1)
    requests = []
    for _ in range(num_items):
        query = prefix + tokens(1, 9)
        requests.append([(query, tokens(1, 7)) for _ in range(int(torch.randint(1, 6, (1,), generator=g)))])
    return requests


def assert_matches_plain(model, requests, results, tol: float = 1e-5) -> None:  # type: ignore[no-untyped-def]
    for pairs, scores in zip(requests, results):
        for (context, continuation), score in zip(pairs, scores):
            expected, greedy = plain_loglikelihood(model, context, continuation)
            assert score.logprob == pytest.approx(expected, abs=tol)
            assert score.is_greedy == greedy
            assert score.num_tokens == len(continuation)


# ------------------------------------------------------------------------------------------------ tokenising


def test_trailing_whitespace_of_the_context_moves_to_the_continuation() -> None:
    tok = char_tokenizer()
    [(context, continuation)] = encode_pairs(tok, [("Question: piqa?\n", " answer")])
    assert tok.decode(context) == "Question: piqa?"
    assert tok.decode(continuation) == "\n answer"


def test_continuation_is_what_the_whole_string_adds_after_the_context() -> None:
    tok = tiny_tokenizer("chatml")  # a trained BPE, where tokens can merge across the boundary
    pairs = [("Hello world, it", "'s a sunny day!"), ("The assistant answers", " briefly."), ("Numbers 1", "234567 and")]
    for (context, continuation), (ctx_ids, cont_ids) in zip(pairs, encode_pairs(tok, pairs)):
        assert ctx_ids == tok.encode(context)
        assert cont_ids == tok.encode(context + continuation)[len(ctx_ids):]
    # lm-evaluation-harness's rule, quirk included: " 1234567" is one token of the whole string, so the
    # continuation keeps only what comes after the context's token count (" and").
    assert [tok.decode([t]) for t in encode_pairs(tok, pairs[2:])[0][1]] == [" and"]


def test_a_continuation_merged_into_the_context_tokens_is_an_error() -> None:
    tok = tiny_tokenizer("chatml")
    # "1234567" is one learned token run: "Numbers 12" alone takes more tokens than the whole string.
    assert len(tok.encode("Numbers 1234567")) <= len(tok.encode("Numbers 12"))
    with pytest.raises(DataError, match="'34567' after 'Numbers 12' encodes to no tokens"):
        encode_pairs(tok, [("Numbers 12", "34567")])


def test_an_empty_context_becomes_the_eos_token() -> None:
    tok = char_tokenizer()
    assert encode_pairs(tok, [("", "ab")]) == [([tok.eos_token_id], tok.encode("ab"))]


# ------------------------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("num_kv_heads", [2, 1, 4], ids=["gqa", "mqa", "mha"])
def test_scores_equal_a_plain_forward_per_choice(num_kv_heads: int) -> None:
    model = tiny_model(num_kv_heads=num_kv_heads)
    requests = random_requests(0)
    assert_matches_plain(model, requests, score_requests(model, requests, batch_size=4))


def test_the_common_prefix_is_computed_once_and_each_query_once_per_item() -> None:
    requests = random_requests(1)
    prefix, rows = plan_rows(requests, window=256)
    assert len(prefix) == 12  # the shared few-shot tokens (the queries' next tokens differ, seed 1)
    assert len(rows) == len(requests)
    fed = len(prefix) + sum(row.width for row in rows)
    plain = sum(len(c) + len(k) - 1 for pairs in requests for c, k in pairs)
    # Every token whose output matters goes through the model once: the prefix, then per item its query rest
    # and each choice's tokens.
    per_item = [len(pairs[0][0]) - 1 - 12 + sum(len(k) for _, k in pairs) for pairs in requests]
    assert fed == 12 + sum(per_item) < plain


def test_batch_size_and_token_budget_do_not_change_the_scores() -> None:
    model = tiny_model()
    requests = random_requests(2)
    one = score_requests(model, requests, batch_size=1)
    many = score_requests(model, requests, batch_size=64)
    squeezed = score_requests(model, requests, batch_size=64, max_batch_tokens=40)
    for a, b, c in zip(one, many, squeezed):
        for x, y, z in zip(a, b, c):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5) == pytest.approx(z.logprob, abs=1e-5)
            assert x.is_greedy == y.is_greedy == z.is_greedy


def test_short_rows_share_a_line_no_wider_than_the_widest_row_and_the_scores_stay_exact() -> None:
    model = tiny_model()
    g = torch.Generator().manual_seed(4)

    def tokens(n: int) -> list[int]:
        return torch.randint(1, 128, (n,), generator=g).tolist()

    # One wide item and many narrow ones, with no common prefix (the 0-shot case): unpacked, every narrow row
    # would be padded to the wide one's width.
    requests = [[(tokens(30), tokens(6)), (tokens(30), tokens(5))]]
    requests += [[(tokens(3), tokens(2)) for _ in range(int(torch.randint(1, 4, (1,), generator=g)))]
                 for _ in range(12)]
    prefix, rows = plan_rows(requests, window=256)
    lines = _lines(rows)
    widest = max(row.width for row in rows)
    assert sorted(id(row) for line in lines for row in line) == sorted(id(row) for row in rows)
    assert all(sum(row.width for row in line) <= widest for line in lines)
    assert len(lines) < len(rows) / 3  # the narrow rows share lines
    for batch_size in (1, 2, 64):
        assert_matches_plain(model, requests, score_requests(model, requests, batch_size=batch_size))


def test_items_wider_than_the_window_split_into_rows_and_long_sequences_are_left_truncated() -> None:
    model = tiny_model(max_position_embeddings=40)
    g = torch.Generator().manual_seed(3)
    shots = torch.randint(1, 128, (10,), generator=g).tolist()
    wide = [(shots + [5, 6, 7], torch.randint(1, 128, (9,), generator=g).tolist()) for _ in range(5)]
    too_long = [(torch.randint(1, 128, (45,), generator=g).tolist(), [3, 4, 5]), (shots + [9], [8])]
    requests = [wide, too_long, [(shots + [1, 2], [3])]]
    prefix, rows = plan_rows(requests, window=40)
    assert all(row.width <= 40 - row.start for row in rows)
    assert sum(1 for row in rows if row.start == 0) == 1  # the truncated choice is scored on its own
    assert_matches_plain(model, requests, score_requests(model, requests, batch_size=3))


def test_greedy_flag_is_true_exactly_when_argmax_decoding_gives_the_continuation() -> None:
    model = tiny_model()
    context = [5, 9, 17, 33, 2]
    greedy = []
    for _ in range(3):  # the model's own greedy continuation
        with torch.no_grad():
            greedy.append(int(model(torch.tensor([context + greedy]))[0, -1].argmax()))
    other = [(greedy[0] + 1) % 128, *greedy[1:]]
    [[hit, miss]] = score_requests(model, [[(context, greedy), (context, other)]])
    assert hit.is_greedy and not miss.is_greedy


def test_bf16_scores_stay_close_to_fp32() -> None:
    model = tiny_model()
    requests = random_requests(4)
    fp32 = score_requests(model, requests)
    bf16 = score_requests(model.to(torch.bfloat16), requests)
    for a, b in zip(fp32, bf16):
        for x, y in zip(a, b):
            assert y.logprob == pytest.approx(x.logprob, abs=0.05 * x.num_tokens)


def test_matches_transformers_on_the_converted_model(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok = tiny_tokenizer("chatml")
    model = tiny_model(vocab_size=tok.vocab_size)
    save_hf_model(model, tmp_path / "m", tokenizer=tok)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    prefix = "Hello world, it's a sunny day!\n\n"
    items = [(prefix + "The user asks questions.", [" Numbers", " spaces", " The assistant"]),
             (prefix + "def square(x):", [" return x", " tabs"])]
    requests = [encode_pairs(tok, [(context, choice) for choice in choices]) for context, choices in items]
    ours = score_requests(model, requests)
    for item, scores in zip(requests, ours):
        for (context, continuation), score in zip(item, scores):
            with torch.no_grad():
                logits = hf(torch.tensor([context + continuation])).logits[0, len(context) - 1 : -1].double()
            expected = float(logits.log_softmax(-1).gather(-1, torch.tensor(continuation)[:, None]).sum())
            assert score.logprob == pytest.approx(expected, abs=1e-5)
