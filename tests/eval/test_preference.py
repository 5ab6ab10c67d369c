"""reward_accuracy and preference_accuracy (DPO implicit-reward accuracy) against plain per-sequence sums."""

from __future__ import annotations

import pytest
import torch

from alignkit.data import PreferenceExample
from alignkit.eval import preference_accuracy, reward_accuracy
from alignkit.model import LlamaForCausalLM
from tests.conftest import tiny_config


def test_reward_accuracy() -> None:
    chosen = torch.tensor([1.0, 0.5, 2.0, -1.0])
    rejected = torch.tensor([0.0, 0.5, 3.0, -2.0])
    # 1 > 0 yes, 0.5 > 0.5 tie (wrong), 2 > 3 no, -1 > -2 yes -> 2 / 4.
    assert reward_accuracy(chosen, rejected) == 0.5
    with pytest.raises(ValueError, match="same shape"):
        reward_accuracy(chosen, rejected[:2])


@torch.no_grad()
def _logp(model: LlamaForCausalLM, prompt: list[int], response: list[int]) -> float:
    """Sum of log p(response token) one sequence at a time, with log_softmax over the full logits."""
    ids = torch.tensor([prompt + response])
    logps = model(ids)[0].log_softmax(-1)
    return sum(float(logps[len(prompt) - 1 + i, tok]) for i, tok in enumerate(response))


def test_preference_accuracy_matches_hand_margins() -> None:
    torch.manual_seed(1)
    policy = LlamaForCausalLM(tiny_config(vocab_size=32))
    policy.init_weights()
    ref = LlamaForCausalLM(tiny_config(vocab_size=32))
    ref.init_weights()
    pairs = [
        PreferenceExample(prompt_ids=[1, 2, 3], chosen_ids=[4, 5], rejected_ids=[6, 7, 8]),
        PreferenceExample(prompt_ids=[9], chosen_ids=[10, 11, 12], rejected_ids=[13]),
        PreferenceExample(prompt_ids=[2, 4], chosen_ids=[6], rejected_ids=[8, 10]),
    ]
    margins = []
    for p in pairs:
        margins.append(
            (_logp(policy, p.prompt_ids, p.chosen_ids) - _logp(ref, p.prompt_ids, p.chosen_ids))
            - (_logp(policy, p.prompt_ids, p.rejected_ids) - _logp(ref, p.prompt_ids, p.rejected_ids))
        )
    expected = sum(m > 0 for m in margins) / 3
    out = preference_accuracy(policy, ref, pairs, pad_id=0, batch_size=2)
    assert out["num"] == 3
    assert out["accuracy"] == pytest.approx(expected)
    assert out["margin_mean"] == pytest.approx(sum(margins) / 3, abs=1e-4)
    chosen = sum(_logp(policy, p.prompt_ids, p.chosen_ids) for p in pairs) / 3
    assert out["logps_chosen"] == pytest.approx(chosen, abs=1e-4)
    # Against itself every margin is exactly 0, and a tie is not a win.
    same = preference_accuracy(policy, policy, pairs)
    assert same["accuracy"] == 0.0 and same["margin_mean"] == pytest.approx(0.0, abs=1e-6)
    # Without a reference: rank by the policy's own log-probs.
    own = [_logp(policy, p.prompt_ids, p.chosen_ids) > _logp(policy, p.prompt_ids, p.rejected_ids) for p in pairs]
    assert preference_accuracy(policy, None, pairs)["accuracy"] == pytest.approx(sum(own) / 3)
