"""Collators and packing: label shift, padding, best-fit decreasing, and the packed == unpacked loss invariant."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from alignkit.data import (
    PreferenceExample,
    TokenizedExample,
    pack_examples,
    packed_collate,
    pad_collate,
    preference_collate,
    shared_prompt_collate,
    shifted_labels,
)
from alignkit.errors import DataError
from alignkit.model import LlamaForCausalLM
from tests.conftest import tiny_config

try:
    from alignkit.losses.lm import causal_lm_loss
except ImportError:  # the losses package may not exist yet; the same CE written inline
    def causal_lm_loss(logits, labels, *, num_tokens=None):  # type: ignore[no-untyped-def]
        total = F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=-100)
        return total / (num_tokens or (labels != -100).sum()), {}


def example(ids: list[int], mask: list[int]) -> TokenizedExample:
    return TokenizedExample(input_ids=ids, loss_mask=[bool(m) for m in mask])


def random_examples(lengths: list[int], *, seed: int = 0, vocab: int = 128) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        prompt = rng.randint(1, n - 1)  # a prompt without loss, then a response with loss
        out.append(example([rng.randrange(vocab) for _ in range(n)], [0] * prompt + [1] * (n - prompt)))
    return out


def test_shifted_labels_by_hand() -> None:
    # tokens 10 11 12 13, targets at positions 2 and 3: position 1 predicts 12, position 2 predicts 13.
    assert shifted_labels([10, 11, 12, 13], [False, False, True, True]) == [-100, 12, 13, -100]


def test_pad_collate_by_hand() -> None:
    batch = pad_collate([example([1, 2, 3], [0, 1, 1]), example([4, 5], [0, 1])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch.labels.tolist() == [[2, 3, -100], [5, -100, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch.document_ids is None and batch.num_tokens == 3
    assert pad_collate([example([1, 2, 3], [0, 1, 1])], pad_id=0, pad_to_multiple_of=8).input_ids.shape == (1, 8)


def test_pack_examples_best_fit_decreasing_by_hand() -> None:
    """Lengths 3 5 2 4 1 3 2 into bins of 8, longest first (5 4 3 3 2 2 1):
    5 -> new bin A (3 left); 4 -> does not fit A, new bin B (4 left); 3 -> tightest fit A (0 left);
    3 -> B (1 left); 2 -> new bin C (6 left); 2 -> C (4 left); 1 -> tightest fit B (0 left).
    """
    lengths = [3, 5, 2, 4, 1, 3, 2]
    examples = [example(list(range(n)), [1] * n) for n in lengths]
    bins = pack_examples(examples, max_length=8)
    assert [[len(ex) for ex in b] for b in bins] == [[5, 3], [4, 3, 1], [2, 2]]
    # Ties keep the original order: the first 3 (index 0) went to A, the second (index 5) to B.
    assert bins[0][1] is examples[0] and bins[1][1] is examples[5]
    assert pack_examples(examples, max_length=8) == bins  # deterministic
    with pytest.raises(DataError, match="example 1 has 5 tokens, more than the packing length 4"):
        pack_examples(examples, max_length=4)


def test_pack_examples_fill_rate_on_many_examples() -> None:
    examples = random_examples([random.Random(i).randint(2, 200) for i in range(2000)])
    bins = pack_examples(examples, max_length=256)
    assert sorted(id(ex) for b in bins for ex in b) == sorted(id(ex) for ex in examples)
    assert all(sum(len(ex) for ex in b) <= 256 for b in bins)
    lower_bound = -(-sum(len(ex) for ex in examples) // 256)
    assert len(bins) <= lower_bound + 1  # best-fit decreasing is optimal or one off on such lengths (773 == 773)


def test_packed_collate_positions_documents_labels() -> None:
    bins = [[example([1, 2, 3], [0, 1, 1]), example([4, 5], [1, 1])], [example([6, 7, 8, 9], [0, 0, 1, 1])]]
    batch = packed_collate(bins, max_length=6, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    # The last token of document 0 (3) does not predict the first of document 1 (4), though 4 is a target.
    assert batch.labels.tolist() == [[2, 3, -100, 5, -100, -100], [-100, 8, 9, -100, -100, -100]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert batch.document_ids is not None
    assert batch.document_ids.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]]  # padding: its own document
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    assert batch.num_tokens == 5


def loss_sum(model: LlamaForCausalLM, batch, *, packed: bool) -> torch.Tensor:  # type: ignore[no-untyped-def]
    keep = batch.labels != -100
    kwargs = {"document_ids": batch.document_ids} if packed else {"attention_mask": batch.attention_mask}
    logits = model(batch.input_ids, position_ids=batch.position_ids, logits_mask=keep, **kwargs)
    loss, _ = causal_lm_loss(logits, batch.labels[keep], num_tokens=1)
    return loss


def test_packed_loss_equals_separate_documents() -> None:
    """The packed batch's summed NLL / target count equals the token-weighted mean of each document run alone."""
    model = LlamaForCausalLM(tiny_config()).eval()
    model.init_weights()
    examples = random_examples([7, 30, 12, 25, 3, 18, 40, 9], seed=1)
    with torch.no_grad():
        sums, counts = [], []
        for ex in examples:
            alone = pad_collate([ex], pad_id=0)
            sums.append(loss_sum(model, alone, packed=False))
            counts.append(alone.num_tokens)
        separate = torch.stack(sums).sum() / sum(counts)
        bins = pack_examples(examples, max_length=64)
        assert len(bins) < len(examples)
        packed = packed_collate(bins, max_length=64, pad_id=0)
        assert packed.num_tokens == sum(counts)
        packed_loss = loss_sum(model, packed, packed=True) / packed.num_tokens
    torch.testing.assert_close(packed_loss, separate, rtol=1e-5, atol=1e-5)


def test_padded_loss_equals_per_example_token_weighted() -> None:
    model = LlamaForCausalLM(tiny_config()).eval()
    model.init_weights()
    examples = random_examples([5, 17, 11, 2], seed=2)
    with torch.no_grad():
        per_example = [(loss_sum(model, pad_collate([ex], pad_id=0), packed=False), ex.num_targets) for ex in examples]
        weighted = sum(s for s, _ in per_example) / sum(n for _, n in per_example)
        batch = pad_collate(examples, pad_id=0)
        padded = loss_sum(model, batch, packed=False) / batch.num_tokens
    torch.testing.assert_close(padded, weighted, rtol=1e-5, atol=1e-5)


def test_preference_collate() -> None:
    examples = [PreferenceExample([1, 2], [3, 4], [5]), PreferenceExample([6], [7], [8, 9, 10])]
    batch = preference_collate(examples, pad_id=0)
    assert batch.num_pairs == 2
    assert batch.input_ids.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0], [1, 2, 5, 0], [6, 8, 9, 10]]
    # Targets are the response tokens only, predicted from the position before each.
    assert batch.labels.tolist() == [[-100, 3, 4, -100], [7, -100, -100, -100], [-100, 5, -100, -100], [8, 9, 10, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch.num_tokens == 7


def test_shared_prompt_collate_by_hand() -> None:
    # Pair 0: prompt [1, 2], chosen [3, 4], rejected [5]; pair 1: prompt [6], chosen [7], rejected [8, 9, 10].
    examples = [PreferenceExample([1, 2], [3, 4], [5]), PreferenceExample([6], [7], [8, 9, 10])]
    batch = shared_prompt_collate(examples, pad_id=0, capacity=16)
    assert batch.num_pairs == 2 and batch.num_tokens == 7
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    # The rejected response's positions restart where the chosen one's started.
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2, 3]]
    mask = batch.attention_mask[0, 0].int().tolist()
    assert mask[4] == [1, 1, 0, 0, 1, 0, 0, 0, 0, 0]  # token 5 (rejected) sees its prompt, not the chosen 3, 4
    assert mask[3] == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # token 4 (chosen) sees the prompt and 3
    assert mask[8] == [0, 0, 0, 0, 0, 1, 0, 1, 1, 0]  # token 9: pair 1's prompt and rejected only
    assert batch.chosen_last.tolist() == [3, 6] and batch.rejected_last.tolist() == [4, 9]
    # Targets: chosen responses first (3, 4 | 7), then rejected (5 | 8, 9, 10); each predicted from the position
    # before it, the first token of both responses from the prompt's last position (1 for pair 0, 5 for pair 1).
    assert batch.target_ids.tolist() == [3, 4, 7, 5, 8, 9, 10]
    assert batch.source_index.tolist() == [1, 2, 5, 1, 5, 7, 8]
    assert batch.segment_ids.tolist() == [0, 0, 1, 2, 3, 3, 3]

    # A capacity below the two pairs' total: one row each (best-fit decreasing), padded to the longer row;
    # flat indices count in rows of that width, outputs stay in pair order, padding sees only itself.
    split = shared_prompt_collate(examples, pad_id=0, capacity=6)
    assert split.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert split.chosen_last.tolist() == [3, 6] and split.rejected_last.tolist() == [4, 9]
    assert split.source_index.tolist() == [1, 2, 5, 1, 5, 7, 8]
    padded = shared_prompt_collate([PreferenceExample([1], [2], [3])] + examples[:1], pad_id=0, capacity=5)
    assert padded.input_ids.tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]] or padded.input_ids.tolist() == [
        [1, 2, 3, 4, 5], [1, 2, 3, 0, 0]]
    row = 0 if padded.input_ids[0, 3] == 0 else 1
    assert padded.attention_mask[row, 0, 3].int().tolist() == [0, 0, 0, 1, 0]
