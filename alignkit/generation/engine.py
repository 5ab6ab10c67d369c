"""Batched generation with a KV cache: one prefill, n samples per prompt, finished sequences dropped as they stop.

```python
completions = generate(model, [prompt_ids_0, prompt_ids_1], SamplingParams(temperature=0.7, n=4), tokenizer=tok)
completions[i * n + j]   # sample j of prompt i: token_ids, logprobs (sampling distribution), raw_logprobs, text
```

`generate()` is the simplest use of the one decoding loop (`alignkit.generation.batch.RunningBatch`, which the
continuous-batching `Scheduler` also drives): all prompts join at once as one request, and it runs until every row
has finished. How a call runs (docs/generation.md has the why):

1. Left-pad the prompts into one [B, P] batch with an attention mask, so every row's next token sits in the last
   column; one prefill over the batch fills a preallocated `KVCache`.
2. With n > 1, the prefilled cache and the last logits are repeated n times (`KVCache.repeat_interleave`):
   the samples of one prompt share its prefill.
3. Decode one token per step for every live row. A row stops on a stop token id (kept in `token_ids`, as in
   Hugging Face `generate`) or a stop string (kept out of `text`); rows that stop are removed from the batch
   (`KVCache.select`), so later steps cost only what the live rows need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from alignkit.errors import ConfigError
from alignkit.generation.batch import Row, RunningBatch, check_prompt, make_request, resolve_stop_token_ids
from alignkit.generation.sampling import SamplingParams

if TYPE_CHECKING:
    from alignkit.model import LlamaForCausalLM
    from alignkit.tokenizer import Tokenizer

__all__ = ["Completion", "SamplingParams", "generate", "resolve_stop_token_ids"]


@dataclass
class Completion:
    """One generated sequence. `token_ids`, `logprobs` and `raw_logprobs` have the same length."""

    prompt_index: int
    token_ids: list[int]
    # Log-prob of each token under the distribution it was sampled from (penalty, temperature, top-k/p, min-p
    # applied); 0.0 for greedy decoding, whose choice is deterministic.
    logprobs: list[float]
    # Log-softmax of the raw model logits at each token: the policy's log-prob that RL ratios and KL use.
    raw_logprobs: list[float]
    # "stop": a stop token id (included in token_ids) or a stop string; "length": max_new_tokens or the context.
    finish_reason: str
    # Decoded completion without special tokens, cut before a stop string; None without a tokenizer.
    text: str | None = None


def generate(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    tokenizer: Tokenizer | None = None,
    pack_weights: bool = True,
) -> list[Completion]:
    """Generate `params.n` completions for each prompt (token-id lists); result `i * n + j` is sample j of prompt i.

    Runs under `torch.inference_mode()` in eval mode (the model's train/eval mode is restored afterwards). The
    number of new tokens is also bounded by the context window: the longest prompt plus its new tokens must fit
    in `max_position_embeddings`. `pack_weights` lets CPU decoding use pre-packed oneDNN weights (see
    `alignkit.generation.packed`; it holds a second copy of the linear weights while generating).
    """
    config = model.config
    if params.stop_strings and tokenizer is None:
        raise ConfigError("SamplingParams.stop_strings needs a tokenizer; pass tokenizer= to generate().")
    for index, prompt in enumerate(prompts):
        check_prompt(prompt, config.vocab_size, config.max_position_embeddings, f"prompt {index}")
    if not prompts:
        return []
    if params.max_new_tokens == 0:
        empty = tokenizer.decode([]) if tokenizer is not None else None
        return [Completion(prompt_index=i // params.n, token_ids=[], logprobs=[], raw_logprobs=[],
                           finish_reason="length", text=empty) for i in range(len(prompts) * params.n)]
    # One request for all prompts: one generator, so a seed fixes the whole batch's samples; the longest prompt
    # bounds every row's new tokens alike.
    request = make_request(0, [list(p) for p in prompts], params, model=model, tokenizer=tokenizer)
    batch = RunningBatch(model)
    try:
        with torch.inference_mode():
            batch.open(batch_size_hint=len(request.rows), pack_weights=pack_weights)
            batch.admit([request])
            while batch.rows:
                batch.step()
    finally:
        batch.close()
    return [_completion(row, tokenizer) for row in request.rows]


def _completion(row: Row, tokenizer: Tokenizer | None) -> Completion:
    text = row.text
    if text is None and tokenizer is not None:
        text = tokenizer.decode(row.token_ids)
    return Completion(
        prompt_index=row.prompt_index, token_ids=row.token_ids, logprobs=row.logprobs,
        raw_logprobs=row.raw_logprobs, finish_reason=row.finish_reason or "length", text=text,
    )
