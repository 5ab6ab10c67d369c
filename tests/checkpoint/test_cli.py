"""`alignkit convert` and `alignkit info` through `alignkit.cli.main`: output, files written, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.checkpoint import load_hf_model, save_hf_model
from alignkit.cli import main
from alignkit.model import LlamaForScore
from tests.checkpoint.helpers import make_model, write_gguf
from tests.conftest import tiny_config


def info_rows(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, str]:
    assert main(["info", str(path)]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        label, _, value = line.partition(":")
        rows[label] = value.strip()
    return rows


def test_convert_gguf_to_hf_then_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model(tiny_config(tie_word_embeddings=True))
    write_gguf(model, tmp_path / "m.gguf")
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'hf'}" in out and "model.safetensors" in out and "config.json" in out
    converted = load_hf_model(tmp_path / "hf", dtype=None)
    assert converted.dtype == torch.bfloat16
    assert torch.equal(converted.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16())

    rows = info_rows(capsys, tmp_path / "hf")
    # tiny_config: 2 layers x (attn 32*8*(4*2+2*2)=3072 + mlp 3*32*64=6144 + norms 64) + embed 128*32 + norm 32
    assert rows["parameters"] == "22,688 (matches the stored tensors)"
    assert rows["architecture"] == "LlamaForCausalLM (model_type llama)"
    assert rows["attention"] == "grouped-query (GQA, 2 query heads per KV head)"
    assert rows["heads / KV heads"] == "4 / 2" and rows["head dim"] == "8"
    assert rows["tied embeddings"] == "yes" and rows["context window"] == "256"
    # 2 (K and V) x 2 layers x 2 KV heads x 8 dims = 64 elements per token.
    assert rows["KV cache per token"] == "128 bytes bf16, 256 bytes fp32"
    assert "bfloat16" in rows["format"]

    gguf_rows = info_rows(capsys, tmp_path / "m.gguf")
    assert gguf_rows["format"] == "GGUF (F32 x20)"  # 9 per layer, embeddings, final norm
    assert gguf_rows["parameters"] == rows["parameters"]


def test_convert_hf_score_model_keeps_its_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rm = LlamaForScore(tiny_config())
    rm.init_weights()
    save_hf_model(rm, tmp_path / "rm")
    assert main(["convert", str(tmp_path / "rm"), str(tmp_path / "rm16"), "--dtype", "float16"]) == 0
    assert "LlamaForScore" in capsys.readouterr().out
    config = json.loads((tmp_path / "rm16" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["torch_dtype"] == "float16"
    rows = info_rows(capsys, tmp_path / "rm16")
    # A score head (32) replaces the untied LM head (128 x 32): 26,784 - 4,096 + 32.
    assert rows["parameters"] == "22,720 (matches the stored tensors)"


def test_info_reports_mismatched_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_hf_model(make_model(tiny_config()), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["intermediate_size"] = 96  # config says 3 x 32 x 32 more MLP weights per layer than are stored
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    rows = info_rows(capsys, tmp_path / "m")
    assert rows["parameters"] == "32,928 (MISMATCH: the stored tensors hold 26,784)"


def test_user_errors_print_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("alignkit info: error: ") and "no such file or directory" in err
    save_hf_model(make_model(tiny_config()), tmp_path / "m")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("x")
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "notes")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("alignkit convert: error: ") and "refusing to replace" in err


@pytest.mark.slow
def test_convert_real_gguf_loads_in_transformers(
    smollm2_gguf: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end: SmolLM2 GGUF -> HF dir; transformers' own loaders read the model and tokenizer we wrote."""
    transformers = pytest.importorskip("transformers")
    rows = info_rows(capsys, Path(smollm2_gguf))
    assert rows["parameters"] == "134,515,008 (matches the stored tensors)"
    assert rows["KV cache per token"] == "23,040 bytes bf16, 46,080 bytes fp32"
    assert rows["format"] == "GGUF (Q4_1 x210, F32 x61, Q8_0 x1)"
    assert main(["convert", smollm2_gguf, str(tmp_path / "smol")]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    ours = load_hf_model(tmp_path / "smol")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "smol").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "smol")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # `alignkit info model | head -1`: the reader is gone before the output is written. The command stops quietly
    # with the shell's SIGPIPE status instead of a BrokenPipeError traceback (at its flush or at interpreter exit).
    import os
    import subprocess
    import sys

    from alignkit.cli import SIGPIPE_EXIT

    save_hf_model(make_model(tiny_config()), tmp_path / "hf")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from alignkit.cli import main; "
                             f"sys.exit(main(['info', {str(tmp_path / 'hf')!r}]))"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child has written anything
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == SIGPIPE_EXIT, stderr
    assert stderr == "", stderr


def test_info_prints_normally_to_an_open_pipe(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    save_hf_model(make_model(tiny_config()), tmp_path / "hf")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "alignkit.cli", "info", str(tmp_path / "hf")], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0 and "(matches the stored tensors)" in done.stdout, done.stderr
