"""`alignkit eval` end to end on a tiny model and task files in the three layouts, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.checkpoint.hf import save_hf_model
from alignkit.cli import main
from tests.eval.icl_helpers import (
    CHOICE_RECORDS,
    CONTINUATION_RECORDS,
    PARTIAL_RECORDS,
    char_tokenizer,
    plain_loglikelihood,
    tiny_model,
    write_jsonl,
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_hf_model(tiny_model(), tmp_path / "tiny", tokenizer=char_tokenizer())
    return tmp_path / "tiny"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "icl_eval"
    folder.mkdir(parents=True)
    write_jsonl(folder / "qa.jsonl", CHOICE_RECORDS)
    write_jsonl(folder / "wino.jsonl", PARTIAL_RECORDS)
    return tmp_path / "data"


def test_eval_writes_results_samples_table_and_plot(model_dir: Path, data_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    lambada = write_jsonl(tmp_path / "lambada.jsonl", CONTINUATION_RECORDS)
    out = tmp_path / "out"
    argv = ["eval", "--model", str(model_dir), "--tasks", f"qa,wino,{lambada}", "--shots", "0,2",
            "--limit", "2", "--output", str(out), "--data-dir", str(data_dir), "--batch-size", "2"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["shots"] == [0, 2] and results["shot_pool"] == 2 and results["limit"] == 2
    assert {t: results["tasks"][t]["layout"] for t in results["tasks"]} == {
        "qa": "choices", "wino": "partial", "lambada": "continuation"}
    assert set(results["results"]["qa"]["2"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n",
                                                  "elapsed_s"}
    assert set(results["results"]["wino"]["0"]) == {"acc", "acc_stderr", "n", "elapsed_s"}
    assert set(results["results"]["lambada"]["0"]) == {"acc", "acc_stderr", "perplexity", "perplexity_stderr",
                                                       "n", "elapsed_s"}
    assert all(results["results"][t][k]["n"] == 2 for t in ("qa", "wino", "lambada") for k in ("0", "2"))
    # The table on stdout is the one in results.md.
    assert captured.out in (out / "results.md").read_text() and "| qa | acc_norm |" in captured.out
    samples = [json.loads(line) for line in (out / "samples_qa_2shot.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == [2, 3]
    # The log-likelihoods written are the plain per-choice ones of the saved model.
    import alignkit
    from alignkit.eval.loglikelihood import encode_pairs

    model, tok = alignkit.load(str(model_dir))
    assert tok is not None
    pairs = encode_pairs(tok, [(samples[0]["prompt"], " " + c) for c in samples[0]["choices"]])
    assert samples[0]["loglikelihoods"] == pytest.approx([plain_loglikelihood(model, c, k)[0] for c, k in pairs],
                                                         abs=1e-5)
    pytest.importorskip("matplotlib")
    assert (out / "icl.png").stat().st_size > 0


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # The error is the last line, after at most the loading message; no traceback.
    assert lines[-1].startswith("alignkit eval: error: ") and not any("Traceback" in line for line in lines)
    assert all(line.startswith("loading ") for line in lines[:-1])
    return lines[-1]


def test_bad_input_is_a_one_line_error(model_dir: Path, data_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    base = ["eval", "--model", str(model_dir), "--data-dir", str(data_dir), "--output", str(tmp_path / "o")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHOICE_RECORDS[0]) + "\n{not json}\n")
    assert f"{bad}:2: invalid JSON" in _error(capsys, [*base, "--tasks", str(bad)])
    gold = write_jsonl(tmp_path / "gold.jsonl", [*CHOICE_RECORDS[:3], {"query": "q", "choices": ["a"], "gold": 0}])
    assert f"{gold}:4: 'choices' has 1 entries" in _error(capsys, [*base, "--tasks", str(gold)])
    gold = write_jsonl(tmp_path / "gold2.jsonl", [*CHOICE_RECORDS[:3], {"query": "q", "choices": ["a", "b"], "gold": 7}])
    assert f"{gold}:4: 'gold' is 7, out of range" in _error(capsys, [*base, "--tasks", str(gold)])
    assert "unknown task 'nope'; known tasks" in _error(capsys, [*base, "--tasks", "qa,nope"])
    assert "qa, wino" in _error(capsys, [*base, "--tasks", "nope"])
    assert "5 shots need 5 examples, but the shot pool holds 1" in _error(
        capsys, [*base, "--tasks", "qa", "--shots", "0,5", "--shot-pool", "1"])
    assert "leaves nothing to score" in _error(capsys, [*base, "--tasks", "wino", "--shots", "4"])
    missing = tmp_path / "no" / "such" / "model"
    base[2] = str(missing)
    assert f"{missing}: no such file or directory" in _error(capsys, [*base, "--tasks", "qa"])
