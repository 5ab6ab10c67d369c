"""Two machines, as torchrun sees them: two agents on 127.0.0.1 joined by the c10d rendezvous, one process each,
run `alignkit train pretrain` and get the single-process losses (docs/distributed.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RECIPE = {
    "model": {"init": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                       "num_kv_heads": 2, "max_position_embeddings": 64}},
    "tokenizer": "byte",
    "data": {"max_length": 32, "eval_size": 4},
    "optim": {"lr": 0.01, "warmup_steps": 2},
    "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "report_to": [], "num_threads": 1,
              "peak_flops": 1e12, "save_every": 2},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_command(tmp_path: Path) -> list[str]:
    """`python` arguments of `alignkit train pretrain` on a small text file and the recipe above."""
    texts = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}" for i in range(60)]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "data": {**RECIPE["data"], "train": str(data)}}))
    return ["-m", "alignkit.cli", "train", "pretrain", "--config", str(recipe)]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_on_loopback_train_like_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = pretrain_command(tmp_path)

    single = subprocess.run([sys.executable, *train, f"train.output_dir={tmp_path / 'one'}"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]

    port = free_port()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "alignkit-test",
             "--local-addr", "127.0.0.1", *train, f"train.output_dir={tmp_path / 'two'}"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    outputs = [agent.communicate(timeout=300) for agent in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-3000:]
    # One line for the run, from the rank that speaks for it.
    assert sum(out.count("Run finished") for out, _ in outputs) == 1

    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert a["num_tokens"] == b["num_tokens"]
        for key in ("loss", "grad_norm", "eval/loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["step"], key)
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()


def test_fsdp2_pretrain_checkpoints_and_exports_whole_tensors(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 ... train pretrain train.strategy=fsdp2` (which once crashed at its first
    checkpoint) checkpoints every 2 steps and exports a final model equal to the single-process run's."""
    import torch

    from alignkit.checkpoint import load_pretrained

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = pretrain_command(tmp_path)
    single = subprocess.run([sys.executable, *train, f"train.output_dir={tmp_path / 'one'}"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              *train, f"train.output_dir={tmp_path / 'fsdp2'}", "train.strategy=fsdp2"],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert (tmp_path / "fsdp2" / "checkpoints" / "step_000004" / "model" / "__1_0.distcp").is_file()
    for a, b in zip(rows(tmp_path / "one"), rows(tmp_path / "fsdp2")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5), a["step"]
    one, _ = load_pretrained(tmp_path / "one" / "final")
    two, _ = load_pretrained(tmp_path / "fsdp2" / "final")
    for (name, p), (_, q) in zip(one.named_parameters(), two.named_parameters()):
        assert p.shape == q.shape and torch.allclose(p, q, atol=1e-5), name
