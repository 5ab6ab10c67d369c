"""Reward-model scoring and `alignkit score`: single and JSONL batch, identical to transformers' sequence
classifier on the same directory; a checkpoint without a score head is refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.checkpoint import save_hf_model
from alignkit.cli import main
from alignkit.model import ModelConfig
from alignkit.model.llama import LlamaForScore
from alignkit.rewards import conversation_ids, load_reward_model, score_conversations, score_ids
from alignkit.trainers.common import load_tokenizer
from tests.trainers.preference_helpers import TINY, tiny_base

transformers = pytest.importorskip("transformers")


def tiny_reward_model(directory: Path) -> Path:
    tokenizer = load_tokenizer("byte")
    torch.manual_seed(0)
    model = LlamaForScore(ModelConfig(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, **TINY))
    model.init_weights()
    save_hf_model(model, directory, tokenizer=tokenizer)
    return directory


def hf_score(directory: Path, ids: list[int]) -> float:
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(hf(torch.tensor([ids])).logits[0, 0])


def test_batched_padded_scores_equal_one_at_a_time_and_transformers(tmp_path: Path) -> None:
    directory = tiny_reward_model(tmp_path / "rm")
    model, tokenizer = load_reward_model(directory)
    conversations = [("hi", "hello there, how are you?"), ("2+2?", "4"),
                     ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], None)]
    batched = score_conversations(model, tokenizer, conversations, batch_size=3)  # right padded together
    single = [score_conversations(model, tokenizer, [c])[0] for c in conversations]
    assert batched == pytest.approx(single, abs=1e-5)
    ids = conversation_ids(tokenizer, "2+2?", "4")
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n4<|im_end|>\n")
    assert single[1] == pytest.approx(hf_score(directory, ids), abs=1e-5)
    # Over-long conversations keep their end (where the reward is read).
    long_ids = conversation_ids(tokenizer, "x" * 200, "4", max_length=40)
    assert long_ids == conversation_ids(tokenizer, "x" * 200, "4")[-40:]
    assert score_ids(model, [ids], pad_id=tokenizer.pad_token_id)[0] == pytest.approx(single[1], abs=1e-6)


def test_score_cli_single_and_jsonl_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tiny_reward_model(tmp_path / "rm")
    model, tokenizer = load_reward_model(directory)
    assert main(["score", "--model", str(directory), "--prompt", "2+2?", "--response", "4"]) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = score_conversations(model, tokenizer, [("2+2?", "4")])[0]
    assert len(printed) == 1 and float(printed[0]) == pytest.approx(expected, abs=1e-5)

    rows = [{"prompt": "2+2?", "response": "4"}, {"prompt": "hi", "response": "hello"},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", "--model", str(directory), "--input", str(source), "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and float(printed[0]) == pytest.approx(expected, abs=1e-5)
    out = tmp_path / "scores.txt"
    assert main(["score", "--model", str(directory), "--input", str(source), "--output", str(out)]) == 0
    assert [float(x) for x in out.read_text().splitlines()] == pytest.approx([float(x) for x in printed], abs=1e-5)


def test_score_refuses_models_without_a_score_head_and_bad_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tiny_base(tmp_path / "lm")
    assert main(["score", "--model", base, "--prompt", "a", "--response", "b"]) == 2
    assert "has no score head (no 'score.weight' tensor)" in capsys.readouterr().err
    directory = tiny_reward_model(tmp_path / "rm")
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({"prompt": "a"}) + "\n")
    assert main(["score", "--model", str(directory), "--input", str(source)]) == 2
    err = capsys.readouterr().err
    assert "record 0 of" in err and "has no 'response' field" in err
    assert main(["score", "--model", str(directory), "--prompt", "a"]) == 2
    assert "--prompt and --response" in capsys.readouterr().err


def test_last_token_rewards_with_right_and_left_padding(tmp_path: Path) -> None:
    """Each row's reward is the value at its last real token whichever side the padding is on (generation pads
    on the left); before, left-padded rows read a padding position and were wrong by ~2.4 here."""
    from alignkit.rewards.scoring import last_token_rewards

    model, _ = load_reward_model(tiny_reward_model(tmp_path / "rm"))
    sequences = [[5, 9, 12, 40, 7], [3, 8], [11, 2, 6]]
    width = max(len(s) for s in sequences)
    with torch.no_grad():
        alone = torch.tensor([float(model(torch.tensor([s]))[0, -1]) for s in sequences])
    for side in ("right", "left"):
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
            ids[i, span], mask[i, span] = torch.tensor(s), 1
        with torch.no_grad():
            rewards = last_token_rewards(model, ids, mask)
        assert rewards == pytest.approx(alone, abs=1e-5), side
