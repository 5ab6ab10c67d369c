"""Engine invariants: accumulation is exact, resume is bitwise, crashes keep the last good checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.engine import NonFiniteLossError, StepBatches, latest_checkpoint, lr_at, param_groups
from alignkit.engine import checkpoint as ckpt
from alignkit.engine.config import OptimSection, TrainSection
from alignkit.engine.optim import build_optimizer
from alignkit.errors import ConfigError
from tests.engine.helpers import examples, lm_loss, run, step_batches, tiny_model

COMPARED = ("loss", "grad_norm", "lr")


def test_accumulation_1x8_equals_8x1(tmp_path: Path) -> None:
    """One micro-batch of 8 and eight micro-batches of 1 give the same loss and the same summed gradients.

    Sequences have different numbers of target tokens, so averaging per-micro-batch means would NOT match: the
    engine divides every micro-batch's loss sum by the step's global token count.
    """
    grads: dict[int, list[dict[str, torch.Tensor]]] = {1: [], 8: []}
    rows = {}
    for micro in (8, 1):
        cfg = TrainSection(batch_size=8, micro_batch_size=micro, report_to=[], peak_flops=1e12)
        from alignkit.engine import Engine, Trainable

        engine = Engine({"model": Trainable(tiny_model(), OptimSection(lr=1e-2))}, cfg, run_dir=tmp_path / f"m{micro}",
                        total_steps=3, stream=open("/dev/null", "w"))  # noqa: SIM115
        original = engine.optimizers["model"].step

        def capture(*args: object, _micro: int = micro, _engine=engine, _orig=original, **kw: object) -> object:
            grads[_micro].append({n: p.grad.clone() for n, p in _engine.modules["model"].named_parameters()})
            return _orig(*args, **kw)

        engine.optimizers["model"].step = capture  # type: ignore[method-assign]
        rows[micro] = engine.train(step_batches(examples(), cfg), lm_loss)
    assert [r["step"] for r in rows[1]] == [1, 2, 3]
    for a, b in zip(rows[8], rows[1]):
        assert a["num_tokens"] == b["num_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["token_accuracy"] == pytest.approx(b["token_accuracy"], abs=1e-6)
    for g8, g1 in zip(grads[8], grads[1]):
        for name in g8:
            assert torch.allclose(g8[name], g1[name], atol=1e-5, rtol=1e-4), name


def _noisy_loss(models: object, batch: object, num_tokens: int) -> tuple[torch.Tensor, dict]:
    # Draws from the torch RNG every step, so a resume that did not restore the RNG would diverge.
    loss, metrics = lm_loss(models, batch, num_tokens)  # type: ignore[arg-type]
    return loss * (1 + 0.1 * torch.rand(())), metrics


class Killed(Exception):
    pass


class KilledAt(StepBatches):
    """Dies when the engine asks for step `kill_at` (1-based), like a process killed mid-run."""

    kill_at = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        for micro in super().__iter__():
            if self.step == self.kill_at:
                raise Killed
            yield micro


def _killed_batches(cfg_kwargs: dict, kill_at: int) -> KilledAt:
    cfg = TrainSection(batch_size=8, micro_batch_size=4, report_to=[], **cfg_kwargs)
    b = step_batches(examples(), cfg)
    killed = KilledAt(b.items, collate=b.collate, batch_size=8, micro_batch_size=4, seed=cfg.seed)
    killed.kill_at = kill_at
    return killed


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_bitwise_identical(tmp_path: Path) -> None:
    """Stopped after step 4 (checkpoint at 4), resumed: steps 5..8 equal the uninterrupted run's bit for bit."""
    common = dict(micro_batch_size=4, save_every=2, keep_last=2)
    _, full = run(tmp_path / "full", total_steps=8, loss_fn=_noisy_loss, **common)
    with pytest.raises(Killed):
        run(tmp_path / "split", total_steps=8, loss_fn=_noisy_loss, batches=_killed_batches({}, kill_at=6), **common)
    assert latest_checkpoint(tmp_path / "split").name == "step_000004"
    # A different init proves the weights come from the checkpoint.
    _, resumed = run(tmp_path / "split", total_steps=8, loss_fn=_noisy_loss, model_seed=123, resume=True, **common)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(full, resumed):
        for key in COMPARED:
            assert a[key] == b[key], (a["step"], key)
    assert _metrics(tmp_path / "split") == resumed
    # keep_last=2: only the two newest checkpoints remain.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "split")] == ["step_000006", "step_000008"]


def test_crash_during_checkpoint_write_resumes_from_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    common = dict(micro_batch_size=4, save_every=2)
    _, full = run(tmp_path / "full", total_steps=6, **common)
    real_write = ckpt._write_state

    def failing_write(path: Path, state: dict) -> None:
        if state["step"] == 4:  # model.safetensors and optimizer.pt are already written
            raise OSError("disk full")
        real_write(path, state)

    monkeypatch.setattr(ckpt, "_write_state", failing_write)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path / "crash", total_steps=6, **common)
    monkeypatch.setattr(ckpt, "_write_state", real_write)
    root = tmp_path / "crash" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_000004", "step_000002"]
    assert (root / ".tmp-step_000004" / "model" / ".metadata").exists()  # every shard was written
    assert latest_checkpoint(tmp_path / "crash").name == "step_000002"
    _, resumed = run(tmp_path / "crash", total_steps=6, resume=True, model_seed=7, **common)
    assert not (root / ".tmp-step_000004").exists()
    for a, b in zip(full, resumed):
        for key in COMPARED:
            assert a[key] == b[key], (a["step"], key)


def test_existing_checkpoints_without_resume_refuse_to_overwrite(tmp_path: Path) -> None:
    run(tmp_path / "r", total_steps=2)
    with pytest.raises(ConfigError, match="--resume"):
        run(tmp_path / "r", total_steps=2)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    calls = {"n": 0}

    def exploding(models: object, batch: object, num_tokens: int) -> tuple[torch.Tensor, dict]:
        calls["n"] += 1
        loss, metrics = lm_loss(models, batch, num_tokens)  # type: ignore[arg-type]
        return (loss * math.inf if calls["n"] == 5 else loss), metrics

    with pytest.raises(NonFiniteLossError, match=r"Step 5: the loss is inf.*step_000004"):
        run(tmp_path / "nan", total_steps=8, save_every=2, loss_fn=exploding)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "nan")] == ["step_000002", "step_000004"]
    assert [r["step"] for r in _metrics(tmp_path / "nan")] == [1, 2, 3, 4]


def test_lr_schedule_hand_checked_values() -> None:
    """lr=1, warmup 2, 10 steps, min ratio 0.1. Step 4: progress (4-2)/8 = 0.25;
    cosine 0.1 + 0.9 * (1 + cos(pi/4)) / 2 = 0.868198; linear 0.1 + 0.9 * 0.75 = 0.775."""
    kw = dict(lr=1.0, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_at(1, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(2, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(4, schedule="cosine", **kw) == pytest.approx(0.868198, abs=1e-6)
    assert lr_at(6, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(4, schedule="linear", **kw) == pytest.approx(0.775)
    assert lr_at(10, schedule="linear", **kw) == pytest.approx(0.1)
    assert lr_at(7, schedule="constant", **kw) == 1.0


def test_engine_logs_the_schedule(tmp_path: Path) -> None:
    _, rows = run(tmp_path, total_steps=4, optim=OptimSection(lr=0.01, warmup_steps=2, schedule="linear"))
    assert [r["lr"] for r in rows] == pytest.approx([0.005, 0.01, 0.005, 0.0])
    assert set(rows[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "num_tokens"}


def test_weight_decay_groups_exclude_biases_norms_embeddings() -> None:
    model = tiny_model(attention_bias=True, o_proj_bias=True)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "lm_head.weight" in decayed
    assert "model.layers.0.self_attn.q_proj.bias" in kept
    assert "model.embed_tokens.weight" in kept and "model.norm.weight" in kept
    assert all(n.endswith(("bias", "norm.weight", "layernorm.weight", "embed_tokens.weight")) for n in kept)
    assert len(decayed) + len(kept) == len(list(model.parameters()))
    optimizer = build_optimizer(model, OptimSection())
    assert optimizer.defaults["fused"] is True  # CPU fused AdamW


def test_bf16_autocast_lowers_loss_with_fp32_master_weights(tmp_path: Path) -> None:
    engine, rows = run(tmp_path, total_steps=20, precision="bf16", optim=OptimSection(lr=1e-2, max_grad_norm=1.0))
    assert all(p.dtype == torch.float32 for p in engine.modules["model"].parameters())
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    assert math.isclose(rows[0]["loss"], math.log(64), rel_tol=0.05)  # near-uniform at init


def test_progress_line_eta_counts_the_steps_since_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logged every 10 steps, the first line's ETA uses 10 steps' time (it once read one step, or 00:00)."""
    import io

    from alignkit.engine import logging as metrics_logging

    clock = iter([100.0, 110.0, 130.0])  # created at 100 s; steps 10 and 30 logged at 110 s and 130 s
    monkeypatch.setattr(metrics_logging.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    logger = metrics_logging.MetricsLogger(tmp_path, total_steps=100, report_to=[], stream=stream)
    logger.log({"step": 10, "loss": 1.0, "mfu": 12.5})
    assert stream.getvalue().splitlines()[-1] == "step 10/100 loss=1.0000 mfu=12.5000% eta 01:30"
    logger.start_step = 20  # a run resumed at step 20: 10 steps in 30 s
    logger.log({"step": 30, "loss": 1.0})
    assert stream.getvalue().splitlines()[-1].endswith("eta 03:30")


@pytest.mark.slow
def test_kill_trials_never_leave_an_unloadable_checkpoint(tmp_path: Path) -> None:
    """A process killed at each phase of a save leaves only loadable checkpoints, and --resume continues from
    the newest complete one to the uninterrupted run's losses."""
    import subprocess
    import sys

    from alignkit.engine.checkpoint import load_model_state, read_state
    from tests.conftest import REPO_ROOT
    from tests.engine.kill_worker import PHASES

    def worker(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tests.engine.kill_worker", str(run_dir), *args], cwd=REPO_ROOT,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=180)

    done = worker(tmp_path / "full")
    assert done.returncode == 0, done.stderr[-2000:]
    full = _metrics(tmp_path / "full")
    for phase in PHASES:
        run_dir = tmp_path / phase
        killed = worker(run_dir, "--phase", phase)
        assert killed.returncode == 9, (phase, killed.stderr[-2000:])
        complete = ckpt.list_checkpoints(run_dir)
        expected = {"after_rename": "step_000004", "during_prune": "step_000006"}.get(phase, "step_000002")
        assert complete[-1].name == expected, (phase, complete)
        for path in complete:  # every complete checkpoint loads
            read_state(path)
            load_model_state(path, "model", model=tiny_model(5), optimizer=None, device=torch.device("cpu"))
        resumed = worker(run_dir, "--resume")
        assert resumed.returncode == 0, (phase, resumed.stderr[-2000:])
        for a, b in zip(full, _metrics(run_dir)):
            for key in COMPARED:
                assert a[key] == b[key], (phase, a["step"], key)
