"""Examples -> tensors: padded batches, packed rows (best-fit decreasing), preference batches.

Labels are shifted here, once: labels[t] = input_ids[t + 1] when that token is a target, else -100. So the
logits at position t are scored against labels[t] with no further slicing, and a caller can ask the model for
logits only where labels != -100 (`logits_mask`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch

from alignkit.data.tokenize import PreferenceExample, TokenizedExample
from alignkit.errors import DataError
from alignkit.losses.logprobs import IGNORE_INDEX

BatchT = TypeVar("BatchT")


def _tensors_to(batch: BatchT, device: torch.device | str) -> BatchT:
    """A copy of a batch dataclass with every tensor field moved to `device` (other fields kept)."""
    moved = {f.name: getattr(batch, f.name).to(device, non_blocking=True) for f in fields(batch)  # type: ignore[arg-type]
             if isinstance(getattr(batch, f.name), torch.Tensor)}
    return replace(batch, **moved)  # type: ignore[type-var]


@dataclass
class Batch:
    """A [B, T] training batch. See the module docstring for the label shift."""

    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, shifted; -100 where nothing is predicted
    attention_mask: torch.Tensor  # [B, T] long, 1 real / 0 padding (right padding)
    position_ids: torch.Tensor  # [B, T] long, restarting at 0 per document in packed rows
    document_ids: torch.Tensor | None  # [B, T] long per-token document index in packed rows; None when padded
    num_tokens: int  # labels != -100

    def to(self, device: torch.device | str) -> Batch:
        return _tensors_to(self, device)


@dataclass
class PreferenceBatch:
    """Chosen rows [0, B) then rejected rows [B, 2B), right padded: [2B, T]. Targets are response tokens only."""

    input_ids: torch.Tensor  # [2B, T] long
    attention_mask: torch.Tensor  # [2B, T] long
    position_ids: torch.Tensor  # [2B, T] long
    labels: torch.Tensor  # [2B, T] long, shifted like Batch.labels
    num_pairs: int
    num_tokens: int = 0  # labels != -100, over both halves

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return _tensors_to(self, device)


def shifted_labels(input_ids: Sequence[int], loss_mask: Sequence[bool]) -> list[int]:
    """labels[t] = input_ids[t + 1] if loss_mask[t + 1] else -100; the last position predicts nothing."""
    labels = [tok if target else IGNORE_INDEX for tok, target in zip(input_ids[1:], loss_mask[1:])]
    labels.append(IGNORE_INDEX)
    return labels


def _round_up(length: int, multiple: int | None) -> int:
    if not multiple:
        return length
    return -(-length // multiple) * multiple


def pad_collate(
    examples: Sequence[TokenizedExample], *, pad_id: int, pad_to_multiple_of: int | None = None
) -> Batch:
    """Right-pad examples to the longest one (rounded up to pad_to_multiple_of, for tensor-core friendly shapes)."""
    assert examples, "pad_collate needs at least one example"
    width = _round_up(max(len(ex.input_ids) for ex in examples), pad_to_multiple_of)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(shifted_labels(ex.input_ids, ex.loss_mask), dtype=torch.long)
        attention_mask[row, :n] = 1
    position_ids = torch.arange(width, dtype=torch.long).expand(batch, width).clone()
    return Batch(
        input_ids=input_ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids,
        document_ids=None, num_tokens=int((labels != IGNORE_INDEX).sum()),
    )


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin packing of items with these lengths into bins of `capacity`: lists of item indices.

    Items are taken longest first (ties by original order) and each goes into the open bin with the least
    remaining space that still fits it, or a new bin. Deterministic. Best-fit decreasing uses at most
    11/9 OPT + 1 bins, so bins stay close to full. Every length must be <= capacity.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (remaining space, bin index), kept sorted: bisect finds the tightest bin that fits in O(log bins).
    space: list[tuple[int, int]] = []
    for i in order:
        length = lengths[i]
        assert length <= capacity, f"item {i} of length {length} exceeds the bin capacity {capacity}"
        slot = bisect.bisect_left(space, (length, -1))
        if slot == len(space):
            bins.append([i])
            bisect.insort(space, (capacity - length, len(bins) - 1))
        else:
            remaining, b = space.pop(slot)
            bins[b].append(i)
            bisect.insort(space, (remaining - length, b))
    return bins


def pack_examples(examples: Sequence[TokenizedExample], *, max_length: int) -> list[list[TokenizedExample]]:
    """Best-fit decreasing bin packing into rows of at most max_length tokens (`best_fit_decreasing`)."""
    lengths = [len(ex.input_ids) for ex in examples]
    for i, length in enumerate(lengths):
        if length > max_length:
            raise DataError(
                f"example {i} has {length} tokens, more than the packing length {max_length}; "
                "tokenize with the same max_length (truncation drops or cuts long records)."
            )
    return [[examples[i] for i in b] for b in best_fit_decreasing(lengths, max_length)]


def packed_collate(bins: Sequence[Sequence[TokenizedExample]], *, max_length: int, pad_id: int) -> Batch:
    """One row of exactly max_length tokens per bin: documents concatenated, then padding.

    position_ids restart at 0 for each document and document_ids number the documents of a row, so attention
    (the model's document mask) and RoPE see every document as if it were alone. The last token of a document
    gets label -100 (it does not predict the next document); the padding at the row's end is one more document
    with its own id and -100 labels, so no real token attends to it.
    """
    assert bins, "packed_collate needs at least one bin"
    rows = len(bins)
    input_ids = torch.full((rows, max_length), pad_id, dtype=torch.long)
    labels = torch.full((rows, max_length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, max_length), dtype=torch.long)
    position_ids = torch.zeros((rows, max_length), dtype=torch.long)
    document_ids = torch.zeros((rows, max_length), dtype=torch.long)
    for row, docs in enumerate(bins):
        ids: list[int] = []
        row_labels: list[int] = []
        positions: list[int] = []
        doc_ids: list[int] = []
        for doc, ex in enumerate(docs):
            n = len(ex.input_ids)
            ids += ex.input_ids
            row_labels += shifted_labels(ex.input_ids, ex.loss_mask)  # ends with -100: no cross-document target
            positions += range(n)
            doc_ids += [doc] * n
        used = len(ids)
        if used > max_length:
            raise DataError(f"bin {row} holds {used} tokens, more than max_length {max_length}; pack with the same length.")
        input_ids[row, :used] = torch.tensor(ids, dtype=torch.long)
        labels[row, :used] = torch.tensor(row_labels, dtype=torch.long)
        attention_mask[row, :used] = 1
        position_ids[row, :used] = torch.tensor(positions, dtype=torch.long)
        position_ids[row, used:] = torch.arange(max_length - used)
        document_ids[row, :used] = torch.tensor(doc_ids, dtype=torch.long)
        document_ids[row, used:] = len(docs)
    return Batch(
        input_ids=input_ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids,
        document_ids=document_ids, num_tokens=int((labels != IGNORE_INDEX).sum()),
    )


def preference_collate(
    examples: Sequence[PreferenceExample], *, pad_id: int, pad_to_multiple_of: int | None = None
) -> PreferenceBatch:
    """Rows prompt + chosen for every pair, then prompt + rejected, right padded; targets = response tokens."""
    assert examples, "preference_collate needs at least one example"
    sequences = [(ex.prompt_ids, ex.chosen_ids) for ex in examples] + [
        (ex.prompt_ids, ex.rejected_ids) for ex in examples
    ]
    width = _round_up(max(len(p) + len(r) for p, r in sequences), pad_to_multiple_of)
    rows = len(sequences)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        ids = list(prompt) + list(response)
        mask = [False] * len(prompt) + [True] * len(response)
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(ids)] = torch.tensor(shifted_labels(ids, mask), dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    position_ids = torch.arange(width, dtype=torch.long).expand(rows, width).clone()
    return PreferenceBatch(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
        num_pairs=len(examples), num_tokens=int((labels != IGNORE_INDEX).sum()),
    )


@dataclass
class SharedPromptBatch:
    """Preference pairs packed padding-free, each pair's prompt computed once: rows [R, W].

    A pair is laid out as prompt + chosen + rejected, one pair after another, in rows of at most `capacity`
    tokens. The mask lets a chosen token see its prompt and the chosen tokens before it, a rejected token its
    prompt and the rejected tokens before it, and nothing of other pairs; the rejected response's positions
    restart where the chosen one's started. Every token therefore gets exactly the hidden state it would get
    in its own prompt + response row (the math of `preference_collate`), while the prompt, which HH-RLHF
    conversations are mostly made of, goes through the model once instead of twice, and no padding does.

    Per-response outputs are gathered by flat index into the [R * W] positions:

    - `chosen_last` / `rejected_last` [B]: the last token of each prompt + response (where a reward is read);
    - `source_index` [N]: the positions whose logits predict the response tokens `target_ids` [N], chosen
      responses first (pair by pair), then rejected, like the rows of `preference_collate`. The first token of
      both responses is predicted from the prompt's last position, so that index occurs twice.
    - `segment_ids` [N]: which sequence each target belongs to, 0..B-1 chosen, B..2B-1 rejected.
    """

    input_ids: torch.Tensor  # [R, W] long
    position_ids: torch.Tensor  # [R, W] long
    attention_mask: torch.Tensor  # [R, 1, W, W] bool, True = may attend
    chosen_last: torch.Tensor  # [B] long, flat index
    rejected_last: torch.Tensor  # [B] long
    source_index: torch.Tensor  # [N] long, flat index
    target_ids: torch.Tensor  # [N] long
    segment_ids: torch.Tensor  # [N] long
    num_pairs: int
    num_tokens: int = 0  # N: response tokens of both halves

    def to(self, device: torch.device | str) -> SharedPromptBatch:
        return _tensors_to(self, device)


def shared_prompt_collate(
    examples: Sequence[PreferenceExample], *, pad_id: int, capacity: int
) -> SharedPromptBatch:
    """Pack pairs into rows of at most `capacity` tokens (best-fit decreasing; a longer pair gets a row of its
    own), rows as wide as the longest. See `SharedPromptBatch`; outputs keep the order of `examples`.
    Padding tokens (at the end of a row) attend only to themselves.
    """
    assert examples, "shared_prompt_collate needs at least one example"
    sizes = [len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids) for ex in examples]
    rows: list[list[int]] = []
    placed: list[tuple[int, int]] = [(0, 0)] * len(examples)  # (row, start) of each pair
    for r, members in enumerate(best_fit_decreasing(sizes, max(capacity, *sizes))):
        rows.append([])
        for i in sorted(members):
            ex = examples[i]
            placed[i] = (r, len(rows[r]))
            rows[r].extend(list(ex.prompt_ids) + list(ex.chosen_ids) + list(ex.rejected_ids))
    width = max(len(r) for r in rows)
    num_rows = len(rows)
    input_ids = torch.full((num_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((num_rows, width), dtype=torch.long)
    # Per token: its pair (-1 = padding) and its part (0 prompt, 1 chosen, 2 rejected).
    pair_of = torch.full((num_rows, width), -1, dtype=torch.long)
    part_of = torch.zeros((num_rows, width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    chosen_last, rejected_last = [], []
    sources: tuple[list[int], list[int]] = ([], [])
    targets: tuple[list[int], list[int]] = ([], [])
    segments: tuple[list[int], list[int]] = ([], [])
    num_pairs = len(examples)
    for i, (ex, (r, start)) in enumerate(zip(examples, placed)):
        p, c, j = len(ex.prompt_ids), len(ex.chosen_ids), len(ex.rejected_ids)
        base = r * width + start
        pair_of[r, start : start + p + c + j] = i
        part_of[r, start + p : start + p + c] = 1
        part_of[r, start + p + c : start + p + c + j] = 2
        position_ids[r, start : start + p + c] = torch.arange(p + c)
        position_ids[r, start + p + c : start + p + c + j] = torch.arange(p, p + j)
        prompt_last = base + p - 1
        chosen_last.append(base + p + c - 1 if c else prompt_last)
        rejected_last.append(base + p + c + j - 1 if j else prompt_last)
        # Token k of a response starting at offset s is predicted from s + k - 1, except k = 0 (the prompt's last).
        for half, (offset, ids) in enumerate(((p, ex.chosen_ids), (p + c, ex.rejected_ids))):
            sources[half].extend([prompt_last] + [base + offset + k - 1 for k in range(1, len(ids))] if ids else [])
            targets[half].extend(ids)
            segments[half].extend([i + half * num_pairs] * len(ids))
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]  # [W(query), W(key)]
    same_pair = pair_of[:, :, None] == pair_of[:, None, :]
    part_q, part_k = part_of[:, :, None], part_of[:, None, :]
    visible = same_pair & causal & ((part_k == 0) | (part_k == part_q)) & (pair_of[:, :, None] >= 0)
    visible |= torch.eye(width, dtype=torch.bool)  # padding sees itself: no all-masked row (NaN)
    return SharedPromptBatch(
        input_ids=input_ids, position_ids=position_ids, attention_mask=visible[:, None],
        chosen_last=torch.tensor(chosen_last, dtype=torch.long),
        rejected_last=torch.tensor(rejected_last, dtype=torch.long),
        source_index=torch.tensor(sources[0] + sources[1], dtype=torch.long),
        target_ids=torch.tensor(targets[0] + targets[1], dtype=torch.long),
        segment_ids=torch.tensor(segments[0] + segments[1], dtype=torch.long),
        num_pairs=num_pairs, num_tokens=len(targets[0]) + len(targets[1]),
    )
