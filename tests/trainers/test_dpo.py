"""The DPO trainer: exact log-probs from the concatenated response-only forward, the reference (LoRA-disabled base,
precomputed == on the fly), reference-free losses load no reference, diagnostics, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from alignkit.config import config_from_dict
from alignkit.data import tokenize_preferences
from alignkit.data.pairs import PairItem, collate_pairs
from alignkit.errors import ConfigError, DataError
from alignkit.model.lora import apply_lora
from alignkit.trainers import dpo, run
from alignkit.trainers.common import load_tokenizer
from alignkit.trainers.preference_configs import DPOConfig
from tests.trainers.preference_helpers import fruit_pairs, tiny_base, write_jsonl


@pytest.fixture(autouse=True)
def _restore_threads() -> Any:
    # Tiny models: threads only add overhead (and stall on a shared CPU). Runs also set train.num_threads=1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_policy(tmp_path: Path) -> tuple[Any, Any]:
    from alignkit.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(tiny_base(tmp_path / "base"))
    return model, tokenizer


def micro_batch(tokenizer: Any, records: list[dict], pack_capacity: int | None = None) -> Any:
    examples, _ = tokenize_preferences(records, tokenizer, max_length=128)
    items = [PairItem(ex) for ex in examples]
    return collate_pairs(items, pad_id=tokenizer.pad_token_id, pack_capacity=pack_capacity), examples


def naive_logps(model: Any, prompt: list[int], response: list[int]) -> float:
    """One sequence alone, full [T, V] logits, log_softmax, summed over the response tokens."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = model(ids)[0].log_softmax(-1)  # [T, V]
    return sum(float(logprobs[len(prompt) + k - 1, tok]) for k, tok in enumerate(response))


def dpo_config(tmp_path: Path, base: str, data_path: str, **sections: dict) -> DPOConfig:
    spec: dict[str, Any] = {
        "model": {"path": base},
        "data": {"train": data_path, "max_length": 96, "eval_size": 8},
        "optim": {"lr": 5e-3, "warmup_steps": 0, "schedule": "constant"},
        "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 6, "output_dir": str(tmp_path / "run"),
                  "report_to": [], "num_threads": 1},
        "dpo": {"beta": 0.5},
    }
    for name, values in sections.items():
        spec[name] = {**spec.get(name, {}), **values}
    return config_from_dict(DPOConfig, spec)


# None: the padded [2B, T] batch; 1000: both pairs packed into one row with their prompts shared; 40: each pair
# in a row of its own (the capacity is below one pair's size), padded to the longer row.
@pytest.mark.parametrize("pack_capacity", [None, 1000, 40])
def test_concatenated_response_only_logps_equal_naive_per_sequence_forward(
    tmp_path: Path, pack_capacity: int | None
) -> None:
    model, tokenizer = tiny_policy(tmp_path)
    model.double()  # fp64 on both sides: the comparison measures the method, not fp32 summation order
    # Different lengths on purpose: rows are right padded to the longest of the four.
    records = [{"prompt": "after apple?", "chosen": "banana", "rejected": "a much longer wrong answer"},
               {"prompt": "what comes after the grape in the list?", "chosen": "lemon", "rejected": "plum"}]
    micro, examples = micro_batch(tokenizer, records, pack_capacity)
    if pack_capacity is not None:
        rows = 1 if pack_capacity == 1000 else 2
        assert micro.batch.input_ids.shape[0] == rows
    with torch.no_grad():
        logps, lengths, logits = dpo.sequence_logps(model, micro)
    expected = [naive_logps(model, ex.prompt_ids, ex.chosen_ids) for ex in examples]
    expected += [naive_logps(model, ex.prompt_ids, ex.rejected_ids) for ex in examples]
    assert torch.allclose(logps, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    assert lengths.tolist() == [len(ex.chosen_ids) for ex in examples] + [len(ex.rejected_ids) for ex in examples]
    # Logits exist only at response positions: one row per response token, none for prompts or padding.
    assert logits.shape == (sum(lengths.tolist()), tokenizer.vocab_size)


def test_reference_with_disabled_lora_adapter_equals_the_base_model(tmp_path: Path) -> None:
    model, tokenizer = tiny_policy(tmp_path)
    micro, _ = micro_batch(tokenizer, fruit_pairs(4))
    with torch.no_grad():
        base, _, _ = dpo.sequence_logps(model, micro)
    apply_lora(model, rank=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():  # a trained adapter: B != 0, so the adapted model differs from the base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
        adapted, _, _ = dpo.sequence_logps(model, micro)
    reference = dpo.Reference(model, adapter_disabled=True, description="test")
    chosen, rejected = reference.logps(micro)
    assert (adapted - base).abs().max() > 1e-2
    assert torch.allclose(torch.cat([chosen, rejected]), base, atol=1e-6, rtol=0)
    # The adapter is back on afterwards.
    with torch.no_grad():
        again, _, _ = dpo.sequence_logps(model, micro)
    assert torch.equal(again, adapted)


@pytest.mark.parametrize("lora", [False, True])
def test_precomputed_and_on_the_fly_reference_give_the_same_training_curve(tmp_path: Path, lora: bool) -> None:
    base = tiny_base(tmp_path / "base")
    train = write_jsonl(tmp_path / "pairs.jsonl", fruit_pairs(40))
    curves = {}
    for precompute in (True, False):
        cfg = dpo_config(tmp_path / str(precompute), base, train, reference={"precompute": precompute},
                         lora={"enabled": lora, "rank": 4, "alpha": 8}, train={"eval_every": 3})
        result = run("dpo", cfg)
        curves[precompute] = result.metrics
        assert (result.run_dir / dpo.REFERENCE_CACHE).is_file() == precompute
    keys = ["loss", "rewards/margins", "logps/chosen_delta", "logps/rejected_delta", "eval/rewards/accuracies"]
    for key in keys:
        pre = [row[key] for row in curves[True] if key in row]
        fly = [row[key] for row in curves[False] if key in row]
        assert len(pre) == len(fly) > 0, key
        assert pre == pytest.approx(fly, abs=2e-5), key
    # The policy moved away from the reference (otherwise the comparison above would be trivial).
    assert abs(curves[True][-1]["rewards/margins"]) > 1e-3
    assert curves[True][0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference at step 1: ln 2


def test_packed_pairs_with_shared_prompts_train_exactly_like_padded_pairs(tmp_path: Path) -> None:
    """data.packing (the default on a CPU) changes the layout, not the math: same losses and metrics as padded rows."""
    base = tiny_base(tmp_path / "base")
    data_path = write_jsonl(tmp_path / "pairs.jsonl", fruit_pairs(48))
    curves = []
    for packing in (True, False):
        cfg = dpo_config(tmp_path / f"packing-{packing}", base, data_path, data={"packing": packing},
                         dpo={"loss": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]})
        curves.append([r for r in run("dpo", cfg).metrics if "loss" in r])
    packed, padded = curves
    assert len(packed) == len(padded) == 6
    for a, b in zip(packed, padded):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_precomputed_reference_is_cached_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny_policy(tmp_path)
    items = [PairItem(ex) for ex in tokenize_preferences(fruit_pairs(6), tokenizer, max_length=96)[0]]
    reference = dpo.Reference(model, adapter_disabled=False, description="tiny")
    info = dpo.DistInfo()

    def collate(chunk: list[PairItem]) -> Any:
        return collate_pairs(chunk, pad_id=tokenizer.pad_token_id)

    assert not dpo.precompute_reference({"train": items}, reference, collate, run_dir=tmp_path, batch_size=4,
                                        precision="fp32", info=info)
    first = [(i.reference_chosen, i.reference_rejected) for i in items]
    fresh = [PairItem(i.example) for i in items]
    assert dpo.precompute_reference({"train": fresh}, reference, collate, run_dir=tmp_path, batch_size=2,
                                    precision="fp32", info=info)
    assert [(i.reference_chosen, i.reference_rejected) for i in fresh] == first
    # Another reference (or other data) does not match the fingerprint and is recomputed.
    other = dpo.Reference(model, adapter_disabled=False, description="another")
    assert not dpo.precompute_reference({"train": fresh}, other, collate, run_dir=tmp_path, batch_size=2,
                                        precision="fp32", info=info)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_never_build_or_load_a_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loss: str
) -> None:
    base = tiny_base(tmp_path / "base")
    calls: list[str] = []
    monkeypatch.setattr(dpo, "build_reference", lambda *a, **k: calls.append("build") or None)
    monkeypatch.setattr(dpo, "precompute_reference", lambda *a, **k: calls.append("precompute") or None)
    import alignkit.trainers.common as common

    real_build_model = common.build_model
    loads: list[Any] = []
    monkeypatch.setattr(dpo, "build_model", lambda *a, **k: loads.append(a) or real_build_model(*a, **k))
    cfg = dpo_config(tmp_path, base, write_jsonl(tmp_path / "p.jsonl", fruit_pairs(24)), dpo={"loss": loss})
    result = run("dpo", cfg)
    assert calls == [] and len(loads) == 1  # the policy only
    assert not (result.run_dir / dpo.REFERENCE_CACHE).exists()
    last = result.metrics[-1]
    assert "rewards/accuracies" in last and "logps/chosen" in last and "logits/chosen" in last
    assert not any(key.endswith("_delta") for key in last)


def test_metrics_have_trl_names_and_likelihood_deltas(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base")
    cfg = dpo_config(tmp_path, base, write_jsonl(tmp_path / "p.jsonl", fruit_pairs(24)),
                     dpo={"loss": ["sigmoid"], "rpo_alpha": 0.5}, train={"max_steps": 2})
    rows = run("dpo", cfg).metrics
    for key in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logits/chosen", "logits/rejected", "logps/chosen_delta", "logps/rejected_delta",
                "logps/chosen_delta_per_token", "logps/rejected_delta_per_token", "nll_loss", "loss/sigmoid",
                "loss/nll_chosen", "eval/rewards/accuracies", "eval/logps/chosen_delta"]:
        assert key in rows[-1], key
    first = rows[0]
    # Step 1: policy == reference, so the deltas and rewards are 0, and loss = ln 2 + 0.5 * per-token NLL.
    assert first["logps/chosen_delta"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss"] == pytest.approx(0.693147 + 0.5 * first["nll_loss"], abs=1e-4)


def test_likelihood_monitor_warns_after_window_of_joint_decrease(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="alignkit")

    class Stream:  # what the run's log shows
        def getvalue(self) -> str:
            return "".join(r.getMessage() + "\n" for r in caplog.records)

    stream = Stream()
    monitor = dpo.LikelihoodMonitor(window=3)
    steps = iter(range(1, 100))

    def step(chosen: float, rejected: float) -> None:  # one optimizer step's reduced row
        monitor.observe({"step": next(steps), "logps/chosen_delta": chosen, "logps/rejected_delta": rejected})

    step(-1, -2)
    step(-1, -2)
    assert stream.getvalue() == ""
    step(0.5, -2)  # chosen rose: the streak breaks
    step(-1, -2)
    step(-1, -2)
    assert stream.getvalue() == ""
    # A resumed run continues the streak where the checkpoint left it.
    resumed = dpo.LikelihoodMonitor(window=3)
    resumed.load_state_dict(monitor.state_dict())
    monitor = resumed
    step(-1, -3)
    assert stream.getvalue().count("likelihood displacement") == 1
    assert "last 3 steps" in stream.getvalue() and "-1.000 and -3.000" in stream.getvalue()
    step(-0.75, -0.75)
    assert stream.getvalue().count("likelihood displacement") == 1  # once per episode
    assert monitor.warnings[0].startswith("step 6:")
    monitor.observe({"step": 8, "loss": 0.5})  # a row without reference deltas (reference-free loss) is ignored
    assert len(monitor.history) == 3


def test_bad_input_fails_with_clear_messages_and_no_checkpoints(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "base")
    missing = write_jsonl(tmp_path / "missing.jsonl", fruit_pairs(10) + [{"prompt": "after plum?", "chosen": "apple"}])
    with pytest.raises(DataError, match=r"record 10 of .*missing\.jsonl has no 'rejected' field"):
        run("dpo", dpo_config(tmp_path, base, missing))
    long_prompt = [{"prompt": "after apple? " * 20, "chosen": "banana", "rejected": "grape"}] + fruit_pairs(10)
    long = write_jsonl(tmp_path / "long.jsonl", long_prompt)
    with pytest.raises(DataError, match=r"record 0 of .*long\.jsonl is \d+ prompt \+ \d+ response tokens, longer "
                                        r"than max_length 96"):
        run("dpo", dpo_config(tmp_path, base, long, data={"truncation": "error"}))
    good = write_jsonl(tmp_path / "good.jsonl", fruit_pairs(10))
    with pytest.raises(ConfigError, match=r"dpo\.loss \['simpo'\] is reference-free .* reference\.path"):
        run("dpo", dpo_config(tmp_path, base, good, dpo={"loss": "simpo"}, reference={"path": base}))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dpo_is_a_registered_stage_with_help() -> None:
    from alignkit.cli import build_parser

    parser = build_parser()
    text = parser.parse_args(["train", "dpo", "--config", "x.yaml"]).stage_config
    assert text is DPOConfig
    assert load_tokenizer("byte").pad_token_id == 0
    assert json.loads(json.dumps({"ok": 1}))["ok"] == 1


@pytest.mark.slow
def test_dpo_on_real_hh_rlhf_pairs_and_report(tmp_path: Path, smollm2_gguf: str, shared_data: Path) -> None:
    """SmolLM2-135M-Instruct with LoRA, DPO (sigmoid, beta 0.1) on 96 helpful-base pairs (max 80 tokens, bf16,
    precomputed reference), evaluated on 96 held-out pairs; the run report plots the log-prob curves."""
    from alignkit.report import build_report

    torch.set_num_threads(2)
    cfg = config_from_dict(DPOConfig, {
        "model": {"path": smollm2_gguf},
        "data": {"train": str(shared_data / "hh-rlhf" / "helpful-base"), "max_length": 80, "limit": 192,
                 "eval_size": 96, "seed": 0},
        "optim": {"lr": 5e-4, "warmup_steps": 1},
        "lora": {"enabled": True, "rank": 8, "alpha": 16},
        "dpo": {"beta": 0.1},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 12, "precision": "bf16", "eval_every": 6,
                  "output_dir": str(tmp_path / "dpo"), "report_to": [], "num_threads": 2},
    })
    result = run("dpo", cfg)
    evals = [row for row in result.metrics if "eval/rewards/accuracies" in row]
    print([(row["step"], round(row["eval/rewards/accuracies"], 3)) for row in evals])
    assert evals[-1]["eval/rewards/accuracies"] > 0.5
    assert evals[-1]["eval/rewards/margins"] > 0
    report = build_report(tmp_path, stages=["dpo"])
    assert (tmp_path / "logps.png").is_file() and (tmp_path / "logps_delta.png").is_file()
    assert "logps.png" in report.read_text()


def test_default_packing_is_per_device() -> None:
    """data.packing null (the rm / dpo default): packed pairs on a CPU, padded on a GPU; true / false force it."""
    from alignkit.trainers.configs import DataSection
    from alignkit.trainers.preference_data import pack_capacity

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert DPOConfig().data.packing is None
    assert pack_capacity(DataSection(max_length=64, packing=None), cpu) == 64
    assert pack_capacity(DataSection(max_length=64, packing=None), cuda) is None
    assert pack_capacity(DataSection(max_length=64, packing=True), cuda) == 64
    assert pack_capacity(DataSection(max_length=64, packing=False), cpu) is None
