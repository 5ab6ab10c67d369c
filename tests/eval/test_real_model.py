"""SmolLM2-135M-Instruct (the real GGUF) on the shared task files: the packed scorer equals a plain forward per
choice, and alignkit's tokenizer gives the token ids `transformers`' tokenizer gives under lm-evaluation-harness's
encoding rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alignkit.eval.harness import prepare
from alignkit.eval.loglikelihood import encode_pairs, score_requests
from alignkit.eval.tasks import build_requests, fewshot_prefix, known_tasks, load_task
from tests.eval.icl_helpers import plain_loglikelihood

transformers = pytest.importorskip("transformers")

TASKS = ("arc_easy", "piqa", "winogrande", "lambada_openai")


def hf_encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    """lm-evaluation-harness's `_encode_pair`, written out with the `transformers` tokenizer (no BOS: SmolLM2's
    tokenizer adds none)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


@pytest.mark.slow
def test_packed_scores_and_tokens_on_smollm2(smollm2_gguf: str, shared_data: Path) -> None:
    import alignkit

    if not set(TASKS) <= set(known_tasks(shared_data)):
        pytest.skip(f"the icl_eval files {TASKS} are not all in {shared_data}")
    model, tok = alignkit.load(smollm2_gguf)
    assert tok is not None
    directory, name = os.path.split(smollm2_gguf)
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    for task_name in TASKS:
        task = load_task(task_name, shared_data)
        pool, docs = prepare(task, [2], limit=2)
        pairs = [build_requests(doc, fewshot_prefix(pool, 2)) for doc in docs]
        requests = [encode_pairs(tok, item) for item in pairs]
        assert requests == [[hf_encode_pair(hf_tok, c, k) for c, k in item] for item in pairs]
        for item, scores in zip(requests, score_requests(model, requests)):
            for (context, continuation), score in zip(item, scores):
                expected, greedy = plain_loglikelihood(model, context, continuation)
                assert score.logprob == pytest.approx(expected, abs=1e-4), task_name
                assert score.is_greedy == greedy


@pytest.mark.slow
def test_fp32_scores_stay_near_float64_on_long_continuations(smollm2_gguf: str, shared_data: Path) -> None:
    """PIQA's answers run to about 24 tokens, so an error of 1e-5 per token sums past 1e-4. The packed fp32 scorer
    (the log-softmax of each scored position as logit minus a logsumexp) stays within 1e-4 of a float64 plain
    forward. docs/evaluation.md: lm-evaluation-harness's fp32 `log_softmax` over the vocabulary did not on this
    CPU (up to 5.4e-4 from float64), which is why the two sides' fp32 sums differ by more than 1e-4 there."""
    import torch

    import alignkit

    if "piqa" not in known_tasks(shared_data):
        pytest.skip(f"icl_eval/piqa.jsonl is not in {shared_data}")
    model, tok = alignkit.load(smollm2_gguf)
    exact_model, _ = alignkit.load(smollm2_gguf, dtype=torch.float64)
    assert tok is not None
    pool, docs = prepare(load_task("piqa", shared_data), [5], limit=3)
    requests = [encode_pairs(tok, build_requests(doc, fewshot_prefix(pool, 5))) for doc in docs]
    assert max(len(continuation) for item in requests for _, continuation in item) >= 20
    for item, scores in zip(requests, score_requests(model, requests)):
        for (context, continuation), score in zip(item, scores):
            exact, _ = plain_loglikelihood(exact_model, context, continuation)
            assert score.logprob == pytest.approx(exact, abs=1e-4)
