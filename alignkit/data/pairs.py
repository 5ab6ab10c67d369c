"""Preference pairs as training items: a pair with its margin and precomputed reference log-probs, micro-batches
of pairs (padded [2B, T] or packed with a shared prompt), and the tokenisation that keeps per-record margins."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from alignkit.data.collate import (
    PreferenceBatch,
    SharedPromptBatch,
    preference_collate,
    shared_prompt_collate,
)
from alignkit.data.formats import preference_to_pair
from alignkit.data.tokenize import PreferenceExample, tokenize_preferences
from alignkit.errors import DataError

if TYPE_CHECKING:
    from alignkit.tokenizer import Tokenizer


@dataclass
class PairItem:
    """One training pair with what its loss needs besides the tokens."""

    example: PreferenceExample
    margin: float = 0.0
    # Reference log-probs (summed over the response), when precomputed; None otherwise.
    reference_chosen: float | None = None
    reference_rejected: float | None = None


@dataclass
class PairMicroBatch:
    """A micro-batch of pairs: the tokens (a [2B, T] chosen-then-rejected batch, or pairs packed with a shared
    prompt) and per-pair extras [B]."""

    batch: PreferenceBatch | SharedPromptBatch
    margin: torch.Tensor | None  # [B] float, None when no pair has a margin
    reference_chosen: torch.Tensor | None  # [B] float, precomputed reference log-probs
    reference_rejected: torch.Tensor | None

    @property
    def num_pairs(self) -> int:
        return self.batch.num_pairs

    def to(self, device: torch.device | str) -> PairMicroBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if value is not None:
                moved[name] = value.to(device)
        return PairMicroBatch(**moved)


def count_pairs(micro_batch: PairMicroBatch) -> int:
    """The engine's `count_fn` for preference stages: losses are averaged over pairs, not tokens."""
    return micro_batch.num_pairs


def collate_pairs(items: Sequence[PairItem], *, pad_id: int, with_margin: bool = False,
                  pack_capacity: int | None = None) -> PairMicroBatch:
    """Pairs -> a micro-batch: padded [2B, T] rows, or with `pack_capacity` packed rows of at most that many
    tokens where each pair's prompt is computed once (`shared_prompt_collate`, the `data.packing` layout)."""
    examples = [item.example for item in items]
    batch: PreferenceBatch | SharedPromptBatch
    if pack_capacity is not None:
        batch = shared_prompt_collate(examples, pad_id=pad_id, capacity=pack_capacity)
    else:
        batch = preference_collate(examples, pad_id=pad_id)
    margin = torch.tensor([item.margin for item in items], dtype=torch.float32) if with_margin else None
    reference_chosen = reference_rejected = None
    if items and items[0].reference_chosen is not None:
        reference_chosen = torch.tensor([item.reference_chosen for item in items], dtype=torch.float32)
        reference_rejected = torch.tensor([item.reference_rejected for item in items], dtype=torch.float32)
    return PairMicroBatch(batch, margin, reference_chosen, reference_rejected)


def _margin(record: dict[str, Any], field: str, *, index: int, source: str) -> float:
    value = record.get(field, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"record {index} of {source}: {field!r} must be a finite number; got {value!r}.")
    return float(value)


def tokenize_pairs(
    records: list[dict[str, Any]],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    truncation: str,
    source: str,
    max_prompt_length: int | None,
    strict: bool,
    margin_field: str | None = None,
) -> tuple[list[PairItem], dict[str, int], bool]:
    """Tokenized pairs (with margins when `margin_field` is in the records), stats, and whether margins exist.

    Margins need to know which records survive (identical, unparsable and too-long pairs are dropped), so
    records with a margin are tokenized one at a time; without margins the whole file goes in one batch.
    """
    kwargs: dict[str, Any] = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                                  truncation=truncation, source=source, strict=strict)
    has_margin = margin_field is not None and any(margin_field in r for r in records)
    if not has_margin:
        examples, stats = tokenize_preferences(records, tokenizer, **kwargs)
        return [PairItem(ex) for ex in examples], stats, False
    assert margin_field is not None
    totals = {"pairs": len(records), "kept": 0, "dropped_identical": 0, "dropped_unparsable": 0,
              "dropped_too_long": 0, "truncated": 0, "response_fallback": 0}
    items: list[PairItem] = []
    for index, record in enumerate(records):
        pair = preference_to_pair(record, index=index, source=source)  # raises on a missing field
        if isinstance(pair, str) and not strict:
            totals["dropped_unparsable"] += 1
            continue
        if not isinstance(pair, str) and pair.chosen == pair.rejected:
            totals["dropped_identical"] += 1
            continue
        margin = _margin(record, margin_field, index=index, source=source)
        try:
            examples, stats = tokenize_preferences([record], tokenizer, **kwargs)
        except DataError:
            # Parsable, distinct pairs only vanish when too long under truncation "drop" / "right".
            if truncation not in ("drop", "right"):
                raise
            totals["dropped_too_long"] += 1
            continue
        for key in ("truncated", "response_fallback"):
            totals[key] += stats[key]
        items.append(PairItem(examples[0], margin=margin))
    totals["kept"] = len(items)
    if not items:
        raise DataError(f"no usable preference pairs in {source} ({totals}).")
    return items, totals, True


