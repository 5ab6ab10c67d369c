"""Bad input never breaks a run: hundreds of broken recipes and data files go through every `alignkit train` stage
(the CLI's entry function, in-process) and each ends in a one-line error that names the file, line or key, with no
traceback and no run directory left behind."""

from __future__ import annotations

import copy
import gzip
import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from alignkit.cli import main
from tests.trainers.test_trainers import TINY, base_model, chats, corpus

pytestmark = pytest.mark.slow

TRAIN = {"batch_size": 4, "micro_batch_size": 4, "max_steps": 1, "report_to": [], "peak_flops": 1e12}


def good_recipes(tmp_path: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """A valid tiny recipe per stage, and the format of its training data."""
    base = base_model(tmp_path)
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps(r) + "\n" for r in corpus(40)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in chats(40)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"after {w}?", "chosen": "yes", "rejected": "no"}) + "\n"
                             for w in ("apple", "plum", "fig", "kiwi", "lime", "pear", "date", "nut") * 2))
    small = {"eval_size": 0, "eval_fraction": 0.0, "max_length": 64}
    return {
        "pretrain": ({"model": {"init": TINY}, "tokenizer": "byte", "data": {"train": str(text), **small},
                      "train": TRAIN}, "text"),
        "sft": ({"model": {"path": base}, "data": {"train": str(chat), **small}, "train": TRAIN}, "chat"),
        "rm": ({"model": {"path": base}, "data": {"train": str(pairs), **small}, "train": TRAIN}, "pairs"),
        "dpo": ({"model": {"path": base}, "data": {"train": str(pairs), **small}, "train": TRAIN}, "pairs"),
    }


# (dotted key, bad value): wrong types, negative or zero sizes and rates, values outside their range or choices.
BAD_VALUES = [
    ("train.batch_size", 0), ("train.batch_size", -4), ("train.batch_size", "four"), ("train.batch_size", 2.5),
    ("train.micro_batch_size", 0), ("train.micro_batch_size", 3), ("train.max_steps", 0), ("train.max_steps", -1),
    ("train.max_steps", [1]), ("train.epochs", 0), ("train.epochs", -1.0), ("train.log_every", 0),
    ("train.eval_every", -1), ("train.save_every", -2), ("train.keep_last", -1), ("train.precision", "fp16"),
    ("train.strategy", "zero3"), ("train.device", "tpu"), ("train.seed", "zero"), ("train.report_to", ["mlflow"]),
    ("train.peak_flops", -1.0), ("train.resume", "maybe"), ("optim.lr", -1.0), ("optim.lr", "fast"),
    ("optim.lr", float("nan")), ("optim.weight_decay", -0.1), ("optim.betas", [0.9]), ("optim.betas", [1.5, 0.9]),
    ("optim.eps", 0.0), ("optim.warmup_steps", -3), ("optim.schedule", "exponential"), ("optim.min_lr_ratio", 2.0),
    ("optim.max_grad_norm", -1.0), ("data.max_length", 1), ("data.max_length", "long"), ("data.eval_fraction", 1.5),
    ("data.eval_fraction", -0.1), ("data.truncation", "middle"), ("data.format", "csv"), ("data.packing", "yes"),
    ("data.limit", "ten"), ("model.dtype", "float64"), ("model.gradient_checkpointing", "on"), ("lora.rank", "r"),
    ("lora.enabled", 3), ("tokenizer", ["byte"]),
]
STAGE_BAD_VALUES = {
    "rm": [("rm.center_rewards_coefficient", -1.0), ("rm.head_init", "xavier"), ("rm.train_last_layers", -2),
           ("data.truncation", "split")],
    "dpo": [("dpo.beta", -0.1), ("dpo.beta", 0.0), ("dpo.loss", ["kto"]), ("dpo.loss", []),
            ("dpo.label_smoothing", 0.9), ("dpo.loss_weights", [1.0, 2.0]), ("dpo.rpo_alpha", -1.0),
            ("dpo.simpo_gamma", 0.5), ("dpo.displacement_window", 0), ("reference.precompute", "sometimes")],
    "pretrain": [("model.init", {"hidden_size": 32, "layers": 2}), ("tokenizer", "bpe:many")],
    "sft": [("data.format", "preference"), ("chat_template", 7)],
}
# (dotted key, the misspelt part the message must name)
UNKNOWN_KEYS = [("train.batchsize", "batchsize"), ("optim.learning_rate", "learning_rate"), ("data.trian", "trian"),
                ("modle.path", "modle"), ("lora.r", "lora.r"), ("train.max_step", "max_step"),
                ("optim.warmup", "warmup"), ("data.max_len", "max_len")]


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def bad_data_files(directory: Path, kind: str, rng: random.Random) -> list[tuple[Path | str, str]]:
    """(path, what is wrong) for data files that cannot be trained on."""
    directory.mkdir(parents=True, exist_ok=True)
    good = {"text": {"text": "apple banana cherry"},
            "chat": {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}]},
            "pairs": {"prompt": "a?", "chosen": "b", "rejected": "c"}}[kind]
    wrong_format = {"text": {"body": "no text field"}, "chat": {"messages": "not a list"},
                    "pairs": {"prompt": "a?", "chosen": "b"}}[kind]
    lines = [json.dumps(good)] * 12

    def write(name: str, content: str | bytes) -> Path:
        path = directory / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    cases: list[tuple[Path | str, str]] = [
        (str(directory / "missing.jsonl"), "missing file"),
        (write("empty.jsonl", ""), "empty file"),
        (write("blank.jsonl", "\n\n\n"), "blank lines only"),
        (write("truncated.jsonl", "\n".join(lines) + "\n" + json.dumps(good)[:9]), "truncated last line"),
        (write("invalid.jsonl", "\n".join(lines[:5] + ["{not json}"] + lines[5:])), "invalid JSON line"),
        (write("array.jsonl", "\n".join(lines[:3] + ["[1, 2, 3]"] + lines[3:])), "a line that is not an object"),
        (write("format.jsonl", "\n".join(lines[:7] + [json.dumps(wrong_format)] + lines[7:])), "a wrong record"),
        (write("binary.jsonl", bytes(rng.randrange(256) for _ in range(400))), "binary bytes"),
        (write("latin1.jsonl", "\n".join(lines).encode() + b'\n{"text": "caf\xe9"}\n'), "not UTF-8"),
        (write("badgzip.jsonl.gz", b"\x1f\x8bnot really gzip"), "a broken gzip file"),
        (write("notjson.json", "{\"records\": "), "truncated JSON document"),
        (write("wrongsuffix.xlsx", "\n".join(lines)), "an unsupported file type"),
        (write("nulls.jsonl", "\n".join([json.dumps({k: None for k in good})] * 12)), "null fields"),
        (write("numbers.jsonl", "\n".join([json.dumps({k: 7 for k in good})] * 12)), "numbers instead of text"),
    ]
    (directory / "emptydir").mkdir(exist_ok=True)
    cases.append((str(directory / "emptydir"), "an empty folder"))
    gz = directory / "few.jsonl.gz"
    gz.write_bytes(gzip.compress("\n".join(lines[:2]).encode()))
    cases.append((gz, "fewer records than one batch"))
    return cases


def check_fails_cleanly(capsys: pytest.CaptureFixture[str], argv: list[str], run_dir: Path, what: str) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, f"{what}: exit code {code}\n{err[-2000:]}"
    assert "Traceback" not in err, f"{what}:\n{err[-2000:]}"
    message = [line for line in err.splitlines() if line.startswith("alignkit train: error:")]
    assert len(message) == 1, f"{what}: no one-line error in\n{err[-2000:]}"
    for leftover in ("checkpoints", "final", "metrics.jsonl"):
        assert not (run_dir / leftover).exists(), f"{what}: left {leftover} in {run_dir}"
    return message[0]


def test_bad_recipes_and_data_fail_cleanly_in_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    rng = random.Random(0)
    recipes = good_recipes(tmp_path)
    tried = 0
    for stage, (good, kind) in recipes.items():
        cases: list[tuple[dict[str, Any], str, str]] = []
        for key, value in BAD_VALUES + STAGE_BAD_VALUES.get(stage, []):
            recipe = copy.deepcopy(good)
            set_dotted(recipe, key, value)
            cases.append((recipe, f"{stage}: {key}={value!r}", key.split(".")[-1]))
        for key, misspelt in UNKNOWN_KEYS:
            recipe = copy.deepcopy(good)
            set_dotted(recipe, key, 1)
            cases.append((recipe, f"{stage}: unknown key {key}", misspelt))
        for path, what in bad_data_files(tmp_path / f"data-{stage}", kind, rng):
            recipe = copy.deepcopy(good)
            recipe["data"]["train"] = str(path)
            cases.append((recipe, f"{stage}: {what}", Path(str(path)).name))
        for index, (recipe, what, named) in enumerate(cases):
            run_dir = tmp_path / "runs" / f"{stage}-{index}"
            recipe.setdefault("train", {})["output_dir"] = str(run_dir)
            config = tmp_path / "recipes" / f"{stage}-{index}.yaml"
            config.parent.mkdir(exist_ok=True)
            config.write_text(yaml.safe_dump(recipe))
            message = check_fails_cleanly(capsys, ["train", stage, "--config", str(config)], run_dir, what)
            assert named in message or "record" in message or "line" in message, f"{what}: {message}"
            tried += 1
        # Broken YAML and a recipe that is not a mapping.
        for index, text in enumerate(["train: {batch_size: 4", "- just\n- a list\n", "train: [1, 2]"]):
            config = tmp_path / "recipes" / f"{stage}-broken-{index}.yaml"
            config.write_text(text)
            check_fails_cleanly(capsys, ["train", stage, "--config", str(config)], tmp_path / "runs" / "none",
                                f"{stage}: broken YAML {text!r}")
            tried += 1
    assert tried >= 200, tried
