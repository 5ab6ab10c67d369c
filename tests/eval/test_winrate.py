"""`alignkit winrate` on tiny random models and a tiny random judge: the win rate and every statistic it prints equal
a plain re-computation from the per-prompt records, identical models under greedy decoding tie on every prompt
(exactly 0.5), prompts in the judge's training data are dropped, the length statistics are right on a hand-made
case, and bad input is a one-line error."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from alignkit.checkpoint import save_hf_model
from alignkit.cli import main
from alignkit.errors import DataError
from alignkit.eval.winrate import Answer, normalise_prompt, record_prompt, win_rate_summary
from alignkit.model import LlamaForCausalLM, ModelConfig
from alignkit.rewards.scoring import reward_model_function, score_model_from_causal_lm
from alignkit.trainers.common import load_tokenizer

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=128)
QUESTIONS = ["How do I boil an egg?", "Name a colour.", "What is two plus two?", "Tell me a joke.",
             "Why is the sky blue?", "Write a haiku.", "Is tea better than coffee?", "What day is it?"]


def tiny_lm(seed: int) -> LlamaForCausalLM:
    tokenizer = load_tokenizer("byte")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, initializer_range=0.05,
                                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, **TINY))  # type: ignore[arg-type]
    model.init_weights()
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random policies and a random reward model (random score head), all with the byte tokenizer."""
    root = tmp_path_factory.mktemp("winrate_models")
    tokenizer = load_tokenizer("byte")
    save_hf_model(tiny_lm(0), root / "a", tokenizer=tokenizer)
    save_hf_model(tiny_lm(1), root / "b", tokenizer=tokenizer)
    save_hf_model(score_model_from_causal_lm(tiny_lm(2), head_init="normal"), root / "judge", tokenizer=tokenizer)
    return {"a": root / "a", "b": root / "b", "judge": root / "judge"}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prompt_records() -> list[dict[str, Any]]:
    """Every accepted form: question, prompt (text and messages), messages with a final assistant turn, and
    preference records (an HH-RLHF transcript pair and a {prompt, chosen, rejected} one)."""
    q = QUESTIONS
    return [
        {"question": q[0]}, {"prompt": q[1]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q[2]}]},
        {"messages": [{"role": "user", "content": q[3]}, {"role": "assistant", "content": "No."}]},
        {"chosen": f"\n\nHuman: {q[4]}\n\nAssistant: Rayleigh scattering.",
         "rejected": f"\n\nHuman: {q[4]}\n\nAssistant: It is not."},
        {"prompt": q[5], "chosen": "Leaves fall", "rejected": "no"},
        {"question": q[6]}, {"question": q[7]},
    ]


def run(argv: list[str]) -> int:
    return main(["winrate", *argv])


def read_outputs(out: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(the run's settings and counts, the results, the per-prompt samples)."""
    run = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return run, run.pop("results"), samples


def test_record_prompt_reads_every_form() -> None:
    got = [record_prompt(r, index=i, source="x") for i, r in enumerate(prompt_records())]
    assert got[0] == [{"role": "user", "content": QUESTIONS[0]}]
    assert got[2][0] == {"role": "system", "content": "Be brief."}
    assert got[3] == [{"role": "user", "content": QUESTIONS[3]}]  # the final assistant turn is dropped
    assert got[4] == [{"role": "user", "content": QUESTIONS[4]}]  # the HH transcript's shared prompt
    assert got[5] == [{"role": "user", "content": QUESTIONS[5]}]
    assert normalise_prompt([{"role": "user", "content": "  How do I\n boil an EGG? "}]) == normalise_prompt(got[0])


def test_win_rate_and_statistics_equal_a_recomputation_from_the_samples(
        models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_records())
    out = tmp_path / "out"
    assert run(["--model", str(models["a"]), "--baseline", str(models["b"]), "--judge", str(models["judge"]),
                "--prompts", str(prompts), "--max-new-tokens", "12", "--temperature", "1.0", "--seed", "3",
                "--batch-size", "3", "--output", str(out)]) == 0
    meta, results, samples = read_outputs(out)
    assert meta["num_prompts"] == len(samples) == 8 and meta["excluded"] == 0
    assert (meta["model"], meta["baseline"], meta["judge"]) == (str(models["a"]), str(models["b"]), str(models["judge"]))
    assert [s["index"] for s in samples] == list(range(8))

    outcomes = [1.0 if s["model_score"] > s["baseline_score"] else 0.0 if s["model_score"] < s["baseline_score"]
                else 0.5 for s in samples]
    assert results["win_rate"] == pytest.approx(sum(outcomes) / 8, abs=1e-12)
    assert results["stderr"] == pytest.approx(statistics.stdev(outcomes) / math.sqrt(8), abs=1e-12)
    assert (results["wins"], results["ties"], results["losses"]) == (outcomes.count(1), outcomes.count(0.5),
                                                                    outcomes.count(0))
    assert [s["winner"] for s in samples] == [{1.0: "model", 0.5: "tie", 0.0: "baseline"}[o] for o in outcomes]
    for side in ("model", "baseline"):
        assert results[side]["mean_score"] == pytest.approx(statistics.mean(s[f"{side}_score"] for s in samples))
        assert results[side]["mean_chars"] == pytest.approx(statistics.mean(len(s[f"{side}_answer"]) for s in samples))
        assert results[side]["mean_tokens"] == pytest.approx(statistics.mean(s[f"{side}_tokens"] for s in samples))
    longer = [o for o, s in zip(outcomes, samples) if len(s["model_answer"]) > len(s["baseline_answer"])]
    assert results["model_longer"]["n"] == len(longer)
    if longer:
        assert results["model_longer"]["win_rate"] == pytest.approx(statistics.mean(longer))
    # Two samples differ (sampling at temperature 1 with a seed), so the outcomes are not all ties.
    assert any(s["model_answer"] != s["baseline_answer"] for s in samples)

    # Each score is the judge's own: the conversation re-rendered with the judge's template, scored alone.
    judge = reward_model_function(models["judge"])
    direct = judge([s["prompt"] for s in samples], [s["model_answer"] for s in samples])
    assert [s["model_score"] for s in samples] == pytest.approx(direct, abs=1e-5)
    printed = capsys.readouterr().out
    assert printed == (out / "results.md").read_text() and "Win rate of the model" in printed


def test_identical_models_under_greedy_decoding_tie_on_every_prompt(models: dict[str, Path], tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_records())
    out = tmp_path / "out"
    assert run(["--model", str(models["a"]), "--baseline", str(models["a"]), "--judge", str(models["judge"]),
                "--prompts", str(prompts), "--max-new-tokens", "10", "--output", str(out)]) == 0
    _, results, samples = read_outputs(out)
    assert results["win_rate"] == 0.5 and results["stderr"] == 0.0
    assert (results["wins"], results["ties"], results["losses"]) == (0, 8, 0)
    assert all(s["model_answer"] == s["baseline_answer"] and s["winner"] == "tie" for s in samples)
    assert results["model"] == results["baseline"]


def test_prompts_in_the_judge_training_data_are_dropped(models: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_records())
    # The judge's pairs hold prompts 0 and 6 (other case and spacing) and prompt 4 (an HH transcript), plus one
    # that is not among the prompts, and prompt 1 in a longer conversation (not the same prompt: kept).
    judge_pairs = write_jsonl(tmp_path / "judge_train.jsonl", [
        {"chosen": "\n\nHuman: how do I  boil an egg?\n\nAssistant: In water.",
         "rejected": "\n\nHuman: how do I  boil an egg?\n\nAssistant: Fry it."},
        {"prompt": "IS TEA BETTER THAN COFFEE?", "chosen": "Yes", "rejected": "No"},
        {"chosen": f"\n\nHuman: {QUESTIONS[4]}\n\nAssistant: Light.", "rejected": f"\n\nHuman: {QUESTIONS[4]}"
                                                                                   "\n\nAssistant: Dust."},
        {"prompt": "Something else entirely", "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": QUESTIONS[1]}, {"role": "assistant", "content": "Red."},
                    {"role": "user", "content": "Another?"}], "chosen": "Blue.", "rejected": "No."},
    ])
    out = tmp_path / "out"
    assert run(["--model", str(models["a"]), "--baseline", str(models["b"]), "--judge", str(models["judge"]),
                "--prompts", str(prompts), "--exclude", str(judge_pairs), "--limit", "4", "--max-new-tokens", "4",
                "--output", str(out)]) == 0
    meta, _, samples = read_outputs(out)
    assert meta["excluded"] == 3 and meta["num_prompts_in_file"] == 8
    assert [s["index"] for s in samples] == [1, 2, 3, 5]  # the first 4 left after dropping 0, 4 and 6
    assert "3 dropped as in the judge's training data" in capsys.readouterr().out


def test_length_statistics_on_a_hand_made_case() -> None:
    """Four prompts. Outcomes 1 (2.0 > 1.0), 0 (0.0 < 1.0), 0.5 (1.0 = 1.0), 1 (0.5 > 0.0): win rate 2.5 / 4 =
    0.625; deviations .375, -.625, -.125, .375 square to .6875 in all, so the standard error is
    sqrt(.6875 / 3 / 4) = 0.23936. The model is longer on prompts 0 (4 > 2 characters) and 3 (3 > 1), both won:
    1.0 +- 0; shorter on prompt 1 (2 < 4), lost: 0.0 with no error (n = 1); prompt 2 has the same length.
    Mean tokens 13 / 4 and 13 / 4, characters 15 / 4 and 13 / 4, one answer of four cut on each side."""
    a = [Answer("aaaa", 3, "stop"), Answer("bb", 2, "length"), Answer("cccccc", 5, "stop"), Answer("ddd", 3, "stop")]
    b = [Answer("xx", 2, "stop"), Answer("yyyy", 4, "stop"), Answer("zzzzzz", 6, "length"), Answer("w", 1, "stop")]
    scores_a, scores_b = [2.0, 0.0, 1.0, 0.5], [1.0, 1.0, 1.0, 0.0]
    s = win_rate_summary(scores_a, scores_b, a, b)
    assert s["win_rate"] == 0.625 and s["stderr"] == pytest.approx(0.239357, abs=1e-6) and s["n"] == 4
    assert (s["wins"], s["ties"], s["losses"]) == (2, 1, 1)
    assert s["model_longer"] == {"win_rate": 1.0, "stderr": 0.0, "n": 2}
    assert s["model_shorter"] == {"win_rate": 0.0, "stderr": None, "n": 1}
    assert s["same_length"] == 1
    assert s["model"] == {"mean_score": 0.875, "mean_tokens": 3.25, "mean_chars": 3.75, "truncated": 0.25}
    assert s["baseline"] == {"mean_score": 0.75, "mean_tokens": 3.25, "mean_chars": 3.25, "truncated": 0.25}
    lengths = [4.0, 2.0, 6.0, 3.0, 2.0, 4.0, 6.0, 1.0]
    assert s["score_length_correlation"] == pytest.approx(statistics.correlation(scores_a + scores_b, lengths))


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert run(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("alignkit winrate: error: ") and not any("Traceback" in line for line in lines)
    return lines[-1]


def test_bad_input_is_a_one_line_error(models: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_records())
    base = ["--model", str(models["a"]), "--baseline", str(models["b"]), "--judge", str(models["judge"])]
    assert "does not exist" in _error(capsys, [*base, "--prompts", str(tmp_path / "missing.jsonl")])
    no_prompt = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok"}, {"text": "no prompt here"}])
    assert "record 1 of" in _error(capsys, [*base, "--prompts", str(no_prompt)])
    assert "no prompt of" in _error(capsys, [*base, "--prompts", str(prompts), "--exclude", str(prompts)])
    not_a_judge = ["--model", str(models["a"]), "--baseline", str(models["b"]), "--judge", str(models["a"])]
    assert "not a reward model" in _error(capsys, [*not_a_judge, "--prompts", str(prompts)])
    assert "--limit" in _error(capsys, [*base, "--prompts", str(prompts), "--limit", "0"])
    missing_model = ["--model", str(tmp_path / "nope"), *base[2:]]
    assert "no such file" in _error(capsys, [*missing_model, "--prompts", str(prompts)])
    with pytest.raises(DataError, match="end with a user message"):
        record_prompt({"messages": [{"role": "system", "content": "hi"}]}, index=0, source="x")
