"""The reward-model trainer: Bradley-Terry on pairs, margins aligned with the kept records, the export (same
scores in alignkit and in transformers), LoRA, bad input, and a real run on HH-RLHF with SmolLM2 (slow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from alignkit.config import config_from_dict
from alignkit.engine import DistInfo
from alignkit.engine.checkpoint import read_model_tensors
from alignkit.errors import CheckpointError, DataError
from alignkit.model.llama import LlamaForScore
from alignkit.rewards import conversation_ids, load_reward_model, score_ids
from alignkit.trainers import run
from alignkit.trainers.common import load_tokenizer
from alignkit.trainers.preference_configs import RMConfig
from alignkit.trainers.preference_data import load_preference_data
from tests.trainers.preference_helpers import fruit_pairs, marked_pairs, tiny_base, write_jsonl

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _restore_threads() -> Any:
    # Tiny models: threads only add overhead (and stall on a shared CPU). Runs also set train.num_threads=1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rm_config(tmp_path: Path, base: str, data_path: str, **sections: dict) -> RMConfig:
    spec: dict[str, Any] = {
        "model": {"path": base},
        "data": {"train": data_path, "max_length": 64, "eval_size": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"batch_size": 16, "micro_batch_size": 8, "max_steps": 30, "eval_every": 15,
                  "output_dir": str(tmp_path / "run"), "report_to": [], "num_threads": 1},
    }
    for name, values in sections.items():
        spec[name] = {**spec.get(name, {}), **values}
    return config_from_dict(RMConfig, spec)


def test_reward_model_learns_pairs_and_export_scores_match_alignkit_and_transformers(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base")
    result = run("rm", rm_config(tmp_path, base, write_jsonl(tmp_path / "p.jsonl", marked_pairs(160))))
    evals = [row for row in result.metrics if "eval/accuracy" in row]
    assert len(evals) == 2
    # 32 held-out pairs; chance is 0.5. The rule (chosen ends with "!") is learnable from 128 training pairs.
    assert evals[-1]["eval/accuracy"] >= 0.9, evals
    assert evals[-1]["eval/loss"] < 0.5 * evals[0]["eval/loss"] or evals[-1]["eval/loss"] < 0.2
    for key in ["accuracy", "margin", "mean_reward", "min_reward", "max_reward", "rewards/chosen", "rewards/rejected"]:
        assert key in result.metrics[-1], key
    assert json.loads((result.run_dir / "data_stats.json").read_text())["train_pairs"] == 128

    # The export: an HF LlamaForSequenceClassification directory with score.weight [1, hidden].
    config = json.loads((result.final_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    model, tokenizer = load_reward_model(result.run_dir)
    assert isinstance(model, LlamaForScore) and tuple(model.score.weight.shape) == (1, 32)
    conversations = [("after apple?", "banana!"), ("after apple?", "banana."), ("after plum?", "apple")]
    ids = [conversation_ids(tokenizer, p, r) for p, r in conversations]
    ours = score_ids(model, ids, pad_id=tokenizer.pad_token_id)
    assert ours[0] > ours[1]  # the trained preference
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(result.final_model_dir,
                                                                         dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = [float(hf(torch.tensor([seq])).logits[0, 0]) for seq in ids]
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_packed_pairs_with_shared_prompts_give_the_rewards_and_gradients_of_padded_pairs(tmp_path: Path) -> None:
    """data.packing (the default on a CPU) computes each prompt once in a packed row: same rewards, same gradients."""
    from alignkit.checkpoint import load_pretrained
    from alignkit.data import tokenize_preferences
    from alignkit.data.pairs import PairItem, collate_pairs
    from alignkit.rewards.scoring import score_model_from_causal_lm
    from alignkit.trainers.rm import pair_rewards

    lm, tokenizer = load_pretrained(tiny_base(tmp_path / "base"))
    model = score_model_from_causal_lm(lm, head_init="normal").double()
    records = [{"prompt": "after apple?", "chosen": "banana", "rejected": "a much longer wrong answer"},
               {"prompt": "what comes after the grape in the list?", "chosen": "lemon", "rejected": "plum"},
               {"prompt": "and after plum?", "chosen": "apple!", "rejected": "x"}]
    examples, _ = tokenize_preferences(records, tokenizer, max_length=128)
    items = [PairItem(ex) for ex in examples]
    results = []
    for capacity in (None, 1000, 60):
        model.zero_grad()
        chosen, rejected = pair_rewards(model, collate_pairs(items, pad_id=tokenizer.pad_token_id,
                                                             pack_capacity=capacity))
        (chosen - 2 * rejected).sum().backward()
        results.append((chosen.detach(), rejected.detach(),
                        torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    padded = results[0]
    for packed in results[1:]:
        for a, b in zip(packed, padded):
            # RMSNorm and the reward read-out run in fp32 (as in transformers), so fp32 rounding is the floor.
            assert (a - b).abs().max() < 1e-6 * max(1.0, float(b.abs().max())), float((a - b).abs().max())


def test_packed_and_padded_reward_model_runs_have_the_same_curve(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base")
    data_path = write_jsonl(tmp_path / "p.jsonl", marked_pairs(80))
    curves = []
    for packing in (True, False):
        cfg = rm_config(tmp_path / f"packing-{packing}", base, data_path, data={"packing": packing},
                        train={"max_steps": 4, "eval_every": 2})
        curves.append([r for r in run("rm", cfg).metrics if "loss" in r or "eval/loss" in r])
    for a, b in zip(*curves):
        for key in ("loss", "accuracy", "margin", "grad_norm", "eval/loss", "eval/accuracy"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert len(curves[0]) == len(curves[1]) == 4 and "eval/loss" in curves[0][-1]


def test_lora_reward_model_trains_adapters_and_score_head(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base")
    cfg = rm_config(tmp_path, base, write_jsonl(tmp_path / "p.jsonl", fruit_pairs(64)),
                    lora={"enabled": True, "rank": 4, "alpha": 8}, train={"max_steps": 4, "eval_every": 0})
    result = run("rm", cfg)
    adapter = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["score"]
    model, _ = load_reward_model(result.final_model_dir)  # the merged model
    assert isinstance(model, LlamaForScore)


def test_train_last_layers_freezes_everything_below(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base = tiny_base(tmp_path / "base")
    cfg = rm_config(tmp_path, base, write_jsonl(tmp_path / "p.jsonl", fruit_pairs(64)),
                    rm={"train_last_layers": 1}, train={"max_steps": 2, "eval_every": 0})
    result = run("rm", cfg)
    trained = read_model_tensors(result.run_dir / "checkpoints" / "step_000002")
    assert "score.weight" in trained and "model.norm.weight" in trained
    assert all(k.startswith(("score.", "model.norm.", "model.layers.1.")) for k in trained), sorted(trained)
    before = load_file(str(Path(base) / "model.safetensors"))
    after = load_file(str(result.final_model_dir / "model.safetensors"))
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])


def test_margins_stay_aligned_with_the_pairs_that_survive(tmp_path: Path) -> None:
    """Record 1 (identical responses) is dropped and counted; the others keep their own margin."""
    records = [
        {"prompt": "after apple?", "chosen": "banana", "rejected": "plum", "margin": 1.5},
        {"prompt": "after grape?", "chosen": "lemon", "rejected": "lemon", "margin": 9.0},
        {"prompt": "after mango?", "chosen": "peach", "rejected": "apple"},  # no margin: 0
        {"prompt": "after plum?", "chosen": "apple", "rejected": "cherry", "margin": 0.25},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", records)
    cfg = rm_config(tmp_path, "unused", path, data={"eval_size": 0})  # the model is not built here
    data = load_preference_data(cfg.data, load_tokenizer("byte"), DistInfo(), margin_field="margin")
    assert data.has_margin and data.stats["dropped_identical"] == 1
    assert [item.margin for item in data.train] == [1.5, 0.0, 0.25]
    assert [len(item.example.rejected_ids) for item in data.train][0] == len(load_tokenizer("byte").encode("plum")) + 2


def test_bad_input_fails_with_clear_messages_and_no_checkpoints(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base")
    missing = write_jsonl(tmp_path / "missing.jsonl", fruit_pairs(4) + [{"chosen": "x"}])
    with pytest.raises(DataError, match=r"record 4 of .*missing\.jsonl has no 'rejected' field"):
        run("rm", rm_config(tmp_path, base, missing))
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p" * 100, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"longer than max_length 64"):
        run("rm", rm_config(tmp_path, base, long, data={"truncation": "error"}))
    bad_margin = write_jsonl(tmp_path / "margin.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "x"}])
    with pytest.raises(DataError, match=r"'margin' must be a finite number"):
        run("rm", rm_config(tmp_path, base, bad_margin))
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(CheckpointError, match=r"has no score head"):
        load_reward_model(base)


def test_zero_head_starts_at_ln2_and_normal_head_follows_trl_init(tmp_path: Path) -> None:
    """rm.head_init: zero gives every response reward 0 (first loss = ln 2 = 0.6931...); normal draws the head
    from N(0, 1/sqrt(H + 1)) like TRL (H = 32 here: std 0.174)."""
    import math

    from alignkit.model import LlamaForCausalLM
    from alignkit.rewards import score_model_from_causal_lm
    from tests.conftest import tiny_config

    base = tiny_base(tmp_path / "base")
    cfg = rm_config(tmp_path, base, write_jsonl(tmp_path / "p.jsonl", marked_pairs(64)),
                    train={"max_steps": 1, "log_every": 1, "eval_every": 0})
    first = run("rm", cfg).metrics[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    # Preference stages count pairs, and say so in the metric names.
    assert first["num_pairs"] == 16 and first["pairs_per_s"] > 0 and "tokens_per_s" not in first

    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_config(hidden_size=32))
    weights = torch.cat([score_model_from_causal_lm(lm, head_init="normal").score.weight.flatten() for _ in range(300)])
    assert weights.std().item() == pytest.approx(1 / math.sqrt(33), rel=0.05)
    assert torch.count_nonzero(score_model_from_causal_lm(lm).score.weight) == 0


@pytest.mark.slow
def test_reward_model_on_real_hh_rlhf_pairs_beats_chance(tmp_path: Path, smollm2_gguf: str, shared_data: Path
                                                         ) -> None:
    """SmolLM2-135M-Instruct with a zero-initialised score head and the final norm trained on 400 helpful-base
    pairs (one epoch, max 128 tokens, bf16; the frozen decoder runs without autograd), evaluated on 240 held-out
    pairs of the same file: accuracy clearly above chance (0.5; one standard error at 240 pairs is 0.032)."""
    torch.set_num_threads(2)
    cfg = config_from_dict(RMConfig, {
        "model": {"path": smollm2_gguf},
        "data": {"train": str(shared_data / "hh-rlhf" / "helpful-base"), "max_length": 128, "limit": 640,
                 "eval_size": 240, "seed": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 50, "precision": "bf16", "eval_every": 0,
                  "output_dir": str(tmp_path / "rm"), "report_to": [], "num_threads": 2},
        "rm": {"train_last_layers": 0},
    })
    result = run("rm", cfg)
    accuracy = result.metrics[-1]["eval/accuracy"]
    print(f"held-out accuracy {accuracy:.3f} on 240 pairs")
    assert accuracy >= 0.58, accuracy  # measured: 0.646 (eval loss 0.637 < ln 2)
