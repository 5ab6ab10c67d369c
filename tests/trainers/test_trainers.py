"""Pretraining and SFT end to end on tiny models and in-code data: the loss falls, exports load in transformers
and peft with the same logits, full fine-tuning changes every weight and LoRA only the adapters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.checkpoint import load_pretrained, save_hf_model
from alignkit.config import config_from_dict
from alignkit.engine.checkpoint import read_model_tensors
from alignkit.errors import DataError
from alignkit.model import LlamaForCausalLM
from alignkit.trainers import run
from alignkit.trainers.common import load_tokenizer
from alignkit.trainers.configs import PretrainConfig, SFTConfig

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=128)
WORDS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]


def corpus(n: int = 200) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        i = int(torch.randint(0, len(WORDS), (1,), generator=g))
        # A grammar a small model learns quickly: each fruit is followed by the next in the list.
        out.append({"text": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(6)) + "."})
    return out


def chats(n: int = 160) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        i = int(torch.randint(0, len(WORDS), (1,), generator=g))
        out.append({"messages": [{"role": "user", "content": f"after {WORDS[i]}?"},
                                 {"role": "assistant", "content": WORDS[(i + 1) % len(WORDS)]}]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def base_model(tmp_path: Path) -> str:
    """A tiny random model with the byte-level tokenizer (ChatML template), saved as an HF directory."""
    tokenizer = load_tokenizer("byte")
    torch.manual_seed(0)
    from alignkit.model import ModelConfig

    # A wider init than the default 0.02: with a frozen random LM head of std 0.02 the logits could barely move
    # from uniform, and LoRA (which leaves the head frozen) would have nothing to learn with.
    model = LlamaForCausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id,
                                         initializer_range=0.25, **TINY))
    model.init_weights()
    save_hf_model(model, tmp_path / "base", tokenizer=tokenizer)
    return str(tmp_path / "base")


def hf_logits(directory: Path, input_ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids).logits


def assert_final_matches_transformers(final: Path) -> None:
    model, tokenizer = load_pretrained(final)
    assert tokenizer is not None
    input_ids = torch.tensor([tokenizer.encode("apple banana cherry grape")])
    with torch.no_grad():
        ours = model(input_ids)
    assert (ours - hf_logits(final, input_ids)).abs().max() < 1e-4


def test_bad_data_fails_before_the_run_directory_is_written(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [oops\n')
    cfg = config_from_dict(SFTConfig, {"model": {"path": base_model(tmp_path)}, "data": {"train": str(data)},
                                       "train": {"output_dir": str(tmp_path / "run"), "report_to": []}})
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        run("sft", cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_pretrain_from_scratch_lowers_eval_loss_and_exports(tmp_path: Path) -> None:
    cfg = config_from_dict(PretrainConfig, {
        "model": {"init": TINY}, "tokenizer": "byte",
        "data": {"train": write_jsonl(tmp_path / "corpus.jsonl", corpus()), "max_length": 64, "eval_size": 16},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 60, "eval_every": 30,
                  "output_dir": str(tmp_path / "run"), "report_to": []},
    })
    result = run("pretrain", cfg)
    evals = [r["eval/loss"] for r in result.metrics if "eval/loss" in r]
    assert len(evals) == 2
    # Uniform guessing over the 259-symbol vocabulary costs ln(259) = 5.56 nats per byte.
    assert evals[-1] < 0.5 * math.log(259), evals
    assert result.metrics[-1]["eval/perplexity"] == pytest.approx(math.exp(evals[-1]), rel=1e-6)
    assert (result.run_dir / "config.yaml").is_file() and (result.run_dir / "tb").is_dir() is False
    assert_final_matches_transformers(result.final_model_dir)


@pytest.mark.slow
def test_sft_full_changes_every_weight(tmp_path: Path) -> None:
    base = base_model(tmp_path)
    cfg = config_from_dict(SFTConfig, {
        "model": {"path": base},
        "data": {"train": write_jsonl(tmp_path / "chat.jsonl", chats()), "max_length": 64, "eval_size": 16},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 30, "eval_every": 5,
                  "output_dir": str(tmp_path / "run"), "report_to": []},
    })
    result = run("sft", cfg)
    evals = [r["eval/loss"] for r in result.metrics if "eval/loss" in r]
    assert evals[-1] < 0.75 * evals[0], evals
    before = load_file(str(Path(base) / "model.safetensors"))
    after = load_file(str(result.final_model_dir / "model.safetensors"))
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    assert_final_matches_transformers(result.final_model_dir)


@pytest.mark.slow
def test_sft_lora_trains_only_adapters_and_exports_for_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = base_model(tmp_path)
    cfg = config_from_dict(SFTConfig, {
        "model": {"path": base},
        "data": {"train": write_jsonl(tmp_path / "chat.jsonl", chats()), "max_length": 64, "eval_size": 16},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "lora": {"enabled": True, "rank": 8, "alpha": 16},
        "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 30, "eval_every": 5, "save_every": 10,
                  "output_dir": str(tmp_path / "run"), "report_to": []},
    })
    result = run("sft", cfg)
    evals = [r["eval/loss"] for r in result.metrics if "eval/loss" in r]
    assert evals[-1] < 0.8 * evals[0], evals
    # The optimizer only ever saw adapter weights: the checkpoint holds exactly the LoRA A/B matrices.
    trained = read_model_tensors(result.run_dir / "checkpoints" / "step_000030")
    assert trained and all(".lora_A." in k or ".lora_B." in k for k in trained)
    assert len(trained) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    assert all(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # B starts at zero
    # peft applies the adapter to the transformers base model: same logits as the merged final/.
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf_base, str(result.run_dir / "adapter")).eval()
    _, tokenizer = load_pretrained(result.final_model_dir)
    input_ids = torch.tensor([tokenizer.encode("after plum? peach")])
    with torch.no_grad():
        adapted = peft_model(input_ids).logits
    assert (adapted - hf_logits(result.final_model_dir, input_ids)).abs().max() < 1e-4
    assert (adapted - hf_logits(Path(base), input_ids)).abs().max() > 1e-2  # and it is not the base model


def small_sft(tmp_path: Path, overrides: list[str], *, records: int = 40) -> tuple[Path, list[str]]:
    """A recipe as shipped (32 held out, batches of 8), written to a file, and the overrides of a quick run."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{path: {base_model(tmp_path)}}}\n"
        f"data: {{train: {write_jsonl(tmp_path / 'chat.jsonl', chats(records))}, eval: {tmp_path / 'missing.jsonl'}, "
        "max_length: 64, eval_size: 32}\n"
        f"train: {{batch_size: 8, micro_batch_size: 8, max_steps: 40, output_dir: {tmp_path / 'run'}, report_to: []}}\n"
    )
    return recipe, overrides


def test_selective_checkpointing_trains_like_no_checkpointing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`model.gradient_checkpointing=selective` from the command line, with LoRA dropout (random masks that the
    backward's recomputation must replay): the same losses, step by step, as without checkpointing."""
    import alignkit.model.llama as llama
    from alignkit.config import load_config

    selective_layer_calls = []
    run_layer = llama._without_autocast_cache
    monkeypatch.setattr(llama, "_without_autocast_cache",
                        lambda *args: selective_layer_calls.append(1) or run_layer(*args))
    losses = {}
    for mode in ("false", "selective"):
        recipe, overrides = small_sft(tmp_path / mode, [f"model.gradient_checkpointing={mode}", "train.max_steps=3",
                                                        "train.log_every=1", "lora.enabled=true", "lora.rank=4",
                                                        "lora.dropout=0.2", "optim.lr=1e-2", "data.eval=null"])
        cfg = load_config(SFTConfig, recipe, overrides)
        assert cfg.model.gradient_checkpointing == {"false": False, "selective": "selective"}[mode]
        losses[mode] = [r["loss"] for r in run("sft", cfg).metrics if "loss" in r]
    assert len(losses["false"]) == 3 and losses["selective"] == losses["false"]
    assert selective_layer_calls  # the selective run went through selective checkpointing (the plain one cannot)


def test_data_eval_null_holds_out_from_train(tmp_path: Path) -> None:
    # The recipe names a held-out file that is not there; data.eval=null on the command line clears it (it used to
    # become the file name 'null') and the run holds records out of data.train instead.
    from alignkit.config import load_config

    recipe, overrides = small_sft(tmp_path, ["data.eval=null", "data.eval_size=8", "train.max_steps=1",
                                             "train.eval_on_start=true"])
    cfg = load_config(SFTConfig, recipe, overrides)
    assert cfg.data.eval is None
    result = run("sft", cfg)
    assert [r["step"] for r in result.metrics if "loss" in r] == [1]
    assert math.isfinite(result.metrics[0]["eval/loss"])


def test_quick_run_scales_the_held_out_size_down(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # `train.max_steps=2 data.limit=16` on a recipe that holds out 32: a quarter (4) is held out, with a note, and
    # the 12 left fill a batch of 8.
    from alignkit.config import load_config

    recipe, overrides = small_sft(tmp_path, ["data.eval=null", "train.max_steps=2", "data.limit=16"])
    with caplog.at_level("WARNING", logger="alignkit"):
        result = run("sft", load_config(SFTConfig, recipe, overrides))
    assert "holding out 32 of 16 examples for evaluation would leave 0 to train on; holding out 4" in caplog.text
    assert [r["step"] for r in result.metrics if "loss" in r][-1] == 2


def test_too_little_data_names_every_setting_to_change(tmp_path: Path) -> None:
    from alignkit.config import load_config

    # 12 short chats (16, 4 held out) packed into rows of 256 tokens: fewer rows than a batch of 8.
    recipe, overrides = small_sft(tmp_path, ["data.eval=null", "train.max_steps=2", "data.limit=16",
                                             "data.packing=true", "data.max_length=256", "train.micro_batch_size=4"])
    with pytest.raises(DataError) as error:
        run("sft", load_config(SFTConfig, recipe, overrides))
    message = str(error.value)
    rows = int(message.split("the training set has ")[1].split()[0])
    assert 0 < rows < 8, message
    assert f"fewer than one global batch of train.batch_size=8. To train on this little data, change any of: " \
           f"train.batch_size={rows} train.micro_batch_size=" in message
    for setting in ("data.packing=false", "a larger data.limit (now 16) or none", "now data.eval_size=32"):
        assert setting in message, message
    assert not (tmp_path / "run").exists()  # refused before the run directory is written


def lora_export(tmp_path: Path, base: str) -> Path:
    """export() of a tiny model with LoRA adapters (B set non-zero, so the adapter changes the output)."""
    from alignkit.engine import DistInfo
    from alignkit.trainers.common import add_lora
    from alignkit.trainers.configs import LoRASection
    from alignkit.trainers.stage import export

    model, tokenizer = load_pretrained(tmp_path / "base")
    lora = LoRASection(enabled=True, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    add_lora(model, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    export(model, tokenizer, tmp_path / "run", lora=lora, base_model=base, info=DistInfo())  # type: ignore[arg-type]
    return tmp_path / "run"


def test_adapter_of_an_hf_base_loads_with_auto_peft_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    peft = pytest.importorskip("peft")
    base_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    run_dir = lora_export(tmp_path, "base")  # a relative path, as a recipe may write it
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert not (run_dir / "adapter" / "README.md").exists()
    monkeypatch.chdir(run_dir)  # the recorded base loads from another working directory
    adapted = peft.AutoPeftModelForCausalLM.from_pretrained(str(run_dir / "adapter"), dtype=torch.float32).eval()
    input_ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        logits = adapted(input_ids).logits
    assert (logits - hf_logits(run_dir / "final", input_ids)).abs().max() < 1e-4
    assert (logits - hf_logits(tmp_path / "base", input_ids)).abs().max() > 1e-3


def test_adapter_of_a_gguf_base_says_how_to_attach_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import alignkit.checkpoint

    base_model(tmp_path)
    gguf = tmp_path / "model.gguf"  # the base the run "loaded": the name is all that export looks at
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(alignkit.checkpoint, "find_local_model", lambda name: gguf)
    with caplog.at_level("INFO", logger="alignkit"):
        run_dir = lora_export(tmp_path, "smollm2-135m-instruct")
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct"  # what the user named, not a cache path
    readme = (run_dir / "adapter" / "README.md").read_text()
    for text in ("peft cannot load as a base", "alignkit convert smollm2-135m-instruct base-hf",
                 f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base-hf"), "{run_dir / "adapter"}")',
                 f"{run_dir / 'final'} holds the model with the adapter merged in"):
        assert text in readme and text in caplog.text
    assert "a GGUF file" in lora_export_note(tmp_path, str(gguf))


def lora_export_note(tmp_path: Path, base: str) -> str:
    from alignkit.trainers.stage import adapter_base

    recorded, note = adapter_base(base, tmp_path / "adapter", merged=tmp_path / "final")
    assert recorded == base and note is not None
    return note


def test_lora_finish_line_names_the_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from alignkit.cli import main

    recipe, overrides = small_sft(tmp_path, ["data.eval=null", "data.eval_size=8", "train.max_steps=1",
                                             "lora.enabled=true", "lora.rank=2"])
    assert main(["train", "sft", "--config", str(recipe), *overrides]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("Run finished (eval loss ") and f"LoRA adapter (peft format) in {tmp_path / 'run' / 'adapter'}, " \
        "metrics in" in line, line
