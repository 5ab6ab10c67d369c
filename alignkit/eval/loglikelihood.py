"""Log-likelihood of continuations given contexts, computing every shared prefix once.

A few-shot multiple-choice item asks for log p(choice | context) for each of its C choices. Scored the plain way
(lm-evaluation-harness), each choice is its own sequence `context + choice`, so the context (few-shot examples and
the question, usually most of the tokens) runs through the model C times, and the few-shot examples, identical for
every item, once per choice of every item. Here:

1. The longest token prefix common to every sequence of the call (the few-shot examples) runs once, into a
   `KVCache`; each batch starts from a copy of it.
2. Each item is one packed row: what its choices share (the question) once, then each choice's remaining tokens.
   A 4-D attention mask lets a choice see the shared part and itself, never another choice, and each choice's
   positions continue from the shared part, so every token sees exactly the keys, values and position it would
   see in its own sequence.
3. Short rows are packed side by side into lines as wide as the widest row (first fit, widest first), so a
   forward carries next to no padding; each row keeps its own positions and sees only itself. Lines are
   batched, and the LM head runs only where a continuation token is predicted.

The result equals scoring each `context + continuation` on its own up to float rounding (tests/eval check 1e-5 in
fp32 against a plain forward per choice and against `transformers`).

Tokenisation follows lm-evaluation-harness (`encode_pair`): trailing whitespace of the context moves to the
continuation, the context is encoded alone and the continuation is what encoding context + continuation adds
after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from alignkit.errors import DataError
from alignkit.losses.logprobs import token_logprobs
from alignkit.model.llama import KVCache

if TYPE_CHECKING:
    from alignkit.model import LlamaForCausalLM
    from alignkit.tokenizer import Tokenizer

# One choice to score: (context token ids, continuation token ids).
TokenPair = tuple[list[int], list[int]]


@dataclass(frozen=True)
class Score:
    """A continuation's summed log-likelihood, whether greedy decoding would produce it, and its token count."""

    logprob: float
    is_greedy: bool
    num_tokens: int


# --------------------------------------------------------------------------------------------- tokenising


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> list[TokenPair]:
    """Token ids of (context, continuation) string pairs, as lm-evaluation-harness's `_encode_pair` makes them.

    - Trailing whitespace of the context goes to the continuation ("Answer: " + "yes" -> "Answer:" + " yes"), so
      the space is scored as part of the answer, where the model's BPE puts it.
    - The context is encoded alone; the continuation is what encoding context + continuation adds after that many
      tokens. A BOS is added when the tokenizer adds one (lm-evaluation-harness leaves it to the tokenizer).
    - An empty context becomes the BOS token (EOS without one), so the first continuation token has a context.
    """
    contexts, continuations = [], []
    for context, continuation in pairs:
        stripped = context.rstrip()
        contexts.append(stripped)
        continuations.append(context[len(stripped):] + continuation)
    context_ids = tokenizer.encode_batch(contexts, add_special_tokens=True)
    whole_ids = tokenizer.encode_batch([c + k for c, k in zip(contexts, continuations)], add_special_tokens=True)
    out: list[TokenPair] = []
    for context, continuation, ctx, whole in zip(contexts, continuations, context_ids, whole_ids):
        if not context:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if start is None:
                raise DataError("a context is empty and the tokenizer has neither BOS nor EOS to stand for it; "
                                "give every item a non-empty context.")
            ctx, cont = [start], tokenizer.encode(continuation)
        else:
            cont = whole[len(ctx):]
        if not cont:
            raise DataError(f"the continuation {continuation!r} after {context[-40:]!r} encodes to no tokens; "
                            "there is nothing to score.")
        out.append((list(ctx), list(cont)))
    return out


# --------------------------------------------------------------------------------------------- the plan


@dataclass
class _Choice:
    request: int
    choice: int
    tokens: list[int]  # context + continuation (left-truncated to the window + 1 when longer)
    num_context: int


@dataclass
class Row:
    """One packed row: `shared` (tokens after the common prefix that its choices share), then one suffix per
    choice: its tokens from `start` on, without the last token (which is only ever a target)."""

    start: int  # absolute position of the row's first shared token (= the common prefix length)
    split: int  # absolute position where the choices part ways
    choices: list[_Choice] = field(default_factory=list)

    @property
    def shared(self) -> list[int]:
        return self.choices[0].tokens[self.start : self.split]

    def suffix(self, choice: _Choice) -> list[int]:
        return choice.tokens[self.split : len(choice.tokens) - 1]

    @property
    def width(self) -> int:
        return self.split - self.start + sum(len(self.suffix(c)) for c in self.choices)


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def plan_rows(requests: Sequence[Sequence[TokenPair]], window: int) -> tuple[list[int], list[Row]]:
    """(common prefix, rows): the tokens every sequence starts with, and the packed rows that score the rest.

    A sequence longer than `window` + 1 tokens loses tokens on the left, as in lm-evaluation-harness (the
    continuation is kept whole); such a choice gets a row of its own and takes no part in the common prefix.
    Rows are at most `window` - len(prefix) wide (the model's position limit for a cached forward).
    """
    fitting: list[list[_Choice]] = []
    alone: list[list[_Choice]] = []
    for r, pairs in enumerate(requests):
        group = []
        for i, (context, continuation) in enumerate(pairs):
            if len(continuation) > window:
                raise DataError(f"a continuation of {len(continuation)} tokens is longer than the model's context "
                                f"window of {window}; it cannot be scored.")
            tokens = context + continuation
            if len(tokens) - 1 > window:
                cut = len(tokens) - (window + 1)
                alone.append([_Choice(r, i, tokens[cut:], len(context) - cut)])
            else:
                group.append(_Choice(r, i, tokens, len(context)))
        if group:
            fitting.append(group)
    prefix_len = 0
    if fitting:
        every = [c for g in fitting for c in g]
        # At most the shortest context minus one: every choice's first target is predicted from its last
        # context token, which must be in a row (the cached prefix produces no logits).
        prefix_len = min(_common_prefix([c.tokens for c in every]), min(c.num_context for c in every) - 1)
    prefix = fitting[0][0].tokens[:prefix_len] if fitting else []
    rows: list[Row] = []
    for group, start in [(g, prefix_len) for g in fitting] + [(g, 0) for g in alone]:
        split = min(_common_prefix([c.tokens for c in group]), min(c.num_context for c in group) - 1)
        row = Row(start, split)
        for choice in group:
            # A row must fit the position limit with the cached prefix in front of it: start a new row of the
            # same item when the next choice would overflow it.
            if row.choices and row.width + len(choice.tokens) - 1 - split > window - start:
                rows.append(row)
                row = Row(start, split)
            row.choices.append(choice)
        rows.append(row)
    return prefix, rows


# --------------------------------------------------------------------------------------------- scoring


def _lines(rows: list[Row]) -> list[list[Row]]:
    """Rows packed side by side into lines, first fit in order of decreasing width, each line at most as wide as
    the widest row that starts at the same position (a line holds rows of one `start` only: they continue from
    the same cached prefix). Without packing, a short item's row is padded to its batch's widest; packed, a
    forward carries almost only real tokens, and no line is wider than a row already is (same memory)."""
    lines: list[list[Row]] = []
    for start in sorted({row.start for row in rows}):
        group = sorted((row for row in rows if row.start == start), key=lambda row: -row.width)
        capacity = group[0].width
        packed: list[list[Row]] = []
        room: list[int] = []  # free columns of each line in `packed`
        for row in group:
            for i, free in enumerate(room):
                if row.width <= free:
                    packed[i].append(row)
                    room[i] -= row.width
                    break
            else:
                packed.append([row])
                room.append(capacity - row.width)
        lines += packed
    return lines


def _line_width(line: list[Row]) -> int:
    return sum(row.width for row in line)


def _batches(lines: list[list[Row]], batch_size: int, max_batch_tokens: int) -> list[list[list[Row]]]:
    """Lines sorted by width (widest first, so an out-of-memory batch comes first), cut into batches of at most
    `batch_size` lines and `max_batch_tokens` keys (lines x (cached prefix + width))."""
    # Lines that start after the cached prefix and lines of rows of their own (start 0) never share a batch.
    ordered = sorted(lines, key=lambda line: (line[0].start, -_line_width(line)))
    batches: list[list[list[Row]]] = []
    for line in ordered:
        if batches and batches[-1][0][0].start == line[0].start and len(batches[-1]) < batch_size and \
                (len(batches[-1]) + 1) * (line[0].start + _line_width(batches[-1][0])) <= max_batch_tokens:
            batches[-1].append(line)
        else:
            batches.append([line])
    return batches


@torch.inference_mode()
def score_requests(
    model: LlamaForCausalLM,
    requests: Sequence[Sequence[TokenPair]],
    *,
    batch_size: int = 16,
    max_batch_tokens: int = 16384,
) -> list[list[Score]]:
    """Score every continuation of every request: `result[r][i]` is choice i of request r.

    A request is a list of (context ids, continuation ids), one per choice; its choices share their common
    token prefix in one packed row, and the prefix common to all requests is computed once. Rows are packed
    side by side into lines as wide as the widest row; `batch_size` lines per forward at most, and at most
    `max_batch_tokens` keys per forward (lines x (cached prefix + line width)).
    """
    config = model.config
    window = config.max_position_embeddings
    device = model.device
    for r, pairs in enumerate(requests):
        if not pairs or any(not context or not continuation for context, continuation in pairs):
            raise DataError(f"request {r} needs at least one choice, each with context and continuation tokens.")
    prefix, rows = plan_rows(requests, window)
    results: list[list[Score | None]] = [[None] * len(pairs) for pairs in requests]
    was_training = model.training
    model.eval()
    try:
        prefix_cache = None
        if prefix:
            prefix_cache = KVCache(config, batch_size=1, max_length=len(prefix), dtype=model.dtype, device=device)
            model.model(torch.tensor([prefix], device=device), kv_cache=prefix_cache)
        for batch in _batches(_lines(rows), batch_size, max_batch_tokens):
            _score_batch(model, batch, prefix_cache, results)
    finally:
        model.train(was_training)
    assert all(s is not None for scores in results for s in scores)
    return results  # type: ignore[return-value]


def _score_batch(model: LlamaForCausalLM, batch: list[list[Row]], prefix_cache: KVCache | None,
                 results: list[list[Score | None]]) -> None:
    """One forward over lines of packed rows; fills `results` for each of their choices."""
    device = model.device
    width = max(_line_width(line) for line in batch)
    past = batch[0][0].start  # tokens of the cached prefix in front of every row (0: rows of their own)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    position_ids = torch.zeros(len(batch), width, dtype=torch.long)
    segment = torch.full((len(batch), width), -1, dtype=torch.long)  # the row of the line; -1 padding
    part = torch.zeros((len(batch), width), dtype=torch.long)  # 0 shared, i + 1 suffix of choice i
    sources: list[int] = []  # flat [B * T] index of the position that predicts each target
    targets: list[int] = []
    owners: list[tuple[int, int]] = []  # (request, choice) of each target
    for b, line in enumerate(batch):
        column = 0
        for j, row in enumerate(line):
            shared = row.shared
            input_ids[b, column : column + len(shared)] = torch.tensor(shared, dtype=torch.long)
            position_ids[b, column : column + len(shared)] = torch.arange(row.start, row.split)
            segment[b, column : column + row.width] = j
            column += len(shared)
            for i, choice in enumerate(row.choices):
                suffix = row.suffix(choice)
                input_ids[b, column : column + len(suffix)] = torch.tensor(suffix, dtype=torch.long)
                # Each choice continues from the shared part: the positions its own sequence gives it.
                position_ids[b, column : column + len(suffix)] = torch.arange(row.split, row.split + len(suffix))
                part[b, column : column + len(suffix)] = i + 1
                # Target token t (absolute position) is predicted at absolute position t - 1, which sits in the
                # suffix at column (t - 1 - split).
                for t in range(choice.num_context, len(choice.tokens)):
                    sources.append(b * width + column + (t - 1 - row.split))
                    targets.append(choice.tokens[t])
                    owners.append((choice.request, choice.choice))
                column += len(suffix)
    # Causal inside a row and never across rows; a suffix sees its row's shared part and itself; padding sees
    # only itself (no NaN rows).
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]
    part_q, part_k = part[:, :, None], part[:, None, :]
    segment_q, segment_k = segment[:, :, None], segment[:, None, :]
    visible = causal & (segment_k == segment_q) & (segment_q >= 0) & ((part_k == 0) | (part_k == part_q))
    visible |= torch.eye(width, dtype=torch.bool)
    cache = None
    if past:
        assert prefix_cache is not None
        # Every row starts from the cached prefix, which every position may see.
        visible = torch.cat([torch.ones(len(batch), width, past, dtype=torch.bool), visible], dim=2)
        cache = KVCache(model.config, batch_size=len(batch), max_length=past + width, dtype=model.dtype,
                        device=device)
        for layer in range(len(cache.keys)):
            cache.keys[layer][:, :, :past] = prefix_cache.keys[layer][:, :, :past]
            cache.values[layer][:, :, :past] = prefix_cache.values[layer][:, :, :past]
        cache.length = past
    logits = model(
        input_ids.to(device), position_ids=position_ids.to(device), attention_mask=visible[:, None].to(device),
        kv_cache=cache, logits_index=torch.tensor(sources, device=device),
    )  # [N, V] at the predicting positions only
    target_ids = torch.tensor(targets, device=device)
    logps = token_logprobs(logits, target_ids).double().cpu().tolist()
    greedy = (logits.argmax(-1) == target_ids).cpu().tolist()
    sums: dict[tuple[int, int], list[float | int | bool]] = {}
    for owner, logp, is_greedy in zip(owners, logps, greedy):
        total = sums.setdefault(owner, [0.0, True, 0])
        total[0] += logp
        total[1] = total[1] and is_greedy
        total[2] += 1
    for (r, i), (logp, is_greedy, count) in sums.items():
        results[r][i] = Score(float(logp), bool(is_greedy), int(count))
