"""The step API a trainer drives: several named models with their own optimizers, steps that update only the
models they name, metrics reduced as each one asks, resumable trainer state, and clear errors for misuse."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from alignkit.engine import Engine, Frozen, Models, Trainable, maximum, mean, minimum, total
from alignkit.engine.config import OptimSection, TrainSection
from alignkit.engine.metrics import MetricAccumulator
from alignkit.errors import CheckpointError, ConfigError
from alignkit.model import LlamaForScore, ModelConfig
from tests.engine.helpers import examples, lm_loss, step_batches, tiny_model

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              max_position_embeddings=64)


def value_model(seed: int = 1) -> LlamaForScore:
    torch.manual_seed(seed)
    model = LlamaForScore(ModelConfig(**CONFIG))
    model.init_weights()
    return model


def train_cfg(**kwargs: Any) -> TrainSection:
    return TrainSection(**{"batch_size": 8, "micro_batch_size": 4, "report_to": [], "peak_flops": 1e12, **kwargs})


def two_model_engine(run_dir: Path, *, frozen: dict | None = None, **train: Any) -> Engine:
    models = {
        "policy": Trainable(tiny_model(0), OptimSection(lr=1e-2, schedule="constant")),
        "value": Trainable(value_model(), OptimSection(lr=3e-2, warmup_steps=2, schedule="linear"), total_steps=4),
    }
    return Engine(models, train_cfg(**train), run_dir=run_dir, total_steps=4, frozen=frozen,
                  stream=open(os.devnull, "w"))  # noqa: SIM115


def value_loss(models: Models, batch: Any, num_tokens: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Regress every real token's value to 1 (a toy critic loss), summed / the step's token count."""
    mask = batch.labels != -100
    values = models["value"](batch.input_ids)[mask]
    return (values - 1).pow(2).sum() / num_tokens, {"value_mean": values.mean()}


def policy_and_value_loss(models: Models, batch: Any, num_tokens: int) -> tuple[torch.Tensor, dict[str, Any]]:
    policy_loss, _ = lm_loss(Models({"model": models["policy"]}), batch, num_tokens)
    critic, critic_metrics = value_loss(models, batch, num_tokens)
    return policy_loss + critic, critic_metrics


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_critic_only_step_leaves_the_policy_untouched(tmp_path: Path) -> None:
    engine = two_model_engine(tmp_path)
    engine.start()
    batches = iter(step_batches(examples(), train_cfg()))
    policy_before, value_before = snapshot(engine.modules["policy"]), snapshot(engine.modules["value"])
    # The loss reads both models; only the value model may change.
    row = engine.step(next(batches), policy_and_value_loss, models=["value"])
    assert all(torch.equal(p, policy_before[n]) for n, p in engine.modules["policy"].named_parameters())
    assert all(p.grad is None for p in engine.modules["policy"].parameters())
    assert any(not torch.equal(p, value_before[n]) for n, p in engine.modules["value"].named_parameters())
    assert engine.optimizer_steps == {"policy": 0, "value": 1}
    assert set(row) >= {"loss", "lr/value", "grad_norm/value", "num_tokens", "value_mean"}
    assert "lr/policy" not in row
    # Each schedule counts its own steps: value warms up over 2 of its steps, then decays linearly over 4.
    assert row["lr/value"] == pytest.approx(1.5e-2)
    row = engine.step(next(batches), policy_and_value_loss)
    assert row["lr/policy"] == pytest.approx(1e-2) and row["lr/value"] == pytest.approx(3e-2)
    assert engine.optimizer_steps == {"policy": 1, "value": 2}
    assert any(not torch.equal(p, policy_before[n]) for n, p in engine.modules["policy"].named_parameters())
    engine.finish()


def test_metric_reductions_over_micro_batches() -> None:
    acc = MetricAccumulator(torch.device("cpu"))
    # Two micro-batches with counts 3 and 1.
    acc.add({"plain": 2.0, "per_sample": mean(10.0, weight=2), "per_micro": mean(4.0, weight=1),
             "sum": total(5), "max": maximum(torch.tensor(7.0)), "min": minimum(-1.0)}, 3)
    acc.add({"plain": 6.0, "per_sample": mean(20.0, weight=6), "per_micro": mean(8.0, weight=1),
             "sum": total(2), "max": maximum(3.0), "min": minimum(4.0)}, 1)
    out = acc.result()
    assert out == {"plain": (2 * 3 + 6 * 1) / 4, "per_sample": (10 * 2 + 20 * 6) / 8, "per_micro": 6.0,
                   "sum": 7.0, "max": 7.0, "min": -1.0}
    with pytest.raises(ValueError, match="reduced by"):
        acc.add({"sum": maximum(1.0)}, 1)


def test_unknown_model_names_fail_clearly(tmp_path: Path) -> None:
    engine = two_model_engine(tmp_path)
    engine.start()
    micro = next(iter(step_batches(examples(), train_cfg())))

    def asks_for_reward(models: Models, batch: Any, n: int) -> tuple[torch.Tensor, dict]:
        return models["reward"](batch.input_ids).sum(), {}

    with pytest.raises(ConfigError, match=r"model 'reward'.*'policy', 'value'"):
        engine.step(micro, asks_for_reward)
    with pytest.raises(ConfigError, match=r"names \['critic'\].*'policy', 'value'"):
        engine.step(micro, value_loss, models=["critic"])
    engine.finish()


def test_shared_and_frozen_parameters_are_refused(tmp_path: Path) -> None:
    policy = tiny_model()
    other = tiny_model(1)
    other.lm_head = policy.lm_head  # the same Parameter in two models
    other.model.embed_tokens = policy.model.embed_tokens
    with pytest.raises(ConfigError, match=r"Models 'a' and 'b' share the trainable parameter"):
        Engine({"a": Trainable(policy, OptimSection()), "b": Trainable(other, OptimSection())}, train_cfg(),
               run_dir=tmp_path, total_steps=1)
    with pytest.raises(ConfigError, match=r"Frozen model 'reference' holds .* which trainable model 'policy'"):
        Engine({"policy": Trainable(policy, OptimSection())}, train_cfg(), run_dir=tmp_path, total_steps=1,
               frozen={"reference": Frozen(policy, source="the policy itself")})
    with pytest.raises(ConfigError, match="has no state_dict"):
        Engine({"policy": Trainable(tiny_model(), OptimSection())}, train_cfg(), run_dir=tmp_path,
               total_steps=1).start(data=[[1, 2]])


def test_frozen_models_are_frozen_and_not_checkpointed(tmp_path: Path) -> None:
    reference = tiny_model(5)
    engine = Engine({"policy": Trainable(tiny_model(), OptimSection(lr=1e-2))}, train_cfg(), run_dir=tmp_path,
                    total_steps=1, frozen={"reference": Frozen(reference, source="runs/sft/final")},
                    stream=open(os.devnull, "w"))  # noqa: SIM115
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    assert engine.optimizers.keys() == {"policy"}

    def kl_like(models: Models, batch: Any, n: int) -> tuple[torch.Tensor, dict]:
        loss, _ = lm_loss(Models({"model": models["policy"]}), batch, n)
        with torch.no_grad():
            ref = models["reference"](batch.input_ids)
        return loss, {"reference_logit_mean": ref.float().mean()}

    rows = engine.train(step_batches(examples(), train_cfg()), kl_like)
    assert "reference_logit_mean" in rows[-1]
    files = sorted(p.name for p in (tmp_path / "checkpoints" / "step_000001").iterdir())
    assert files == ["policy", "state.json"]


def test_resume_refuses_changed_models(tmp_path: Path) -> None:
    cfg = train_cfg(save_every=1)
    engine = two_model_engine(tmp_path / "run", save_every=1, frozen={"reference": Frozen(tiny_model(3), "sft-a")})
    engine.train(step_batches(examples(), cfg), policy_and_value_loss)

    def resume(models: dict, frozen: dict) -> None:
        Engine(models, train_cfg(resume=True), run_dir=tmp_path / "run", total_steps=6, frozen=frozen,
               stream=open(os.devnull, "w")).start(data=step_batches(examples(), cfg))  # noqa: SIM115

    policy, value = Trainable(tiny_model(0), OptimSection()), Trainable(value_model(), OptimSection())
    with pytest.raises(CheckpointError, match=r"trainable models \['policy', 'value'\], this run trains \['policy'\]"):
        resume({"policy": policy}, {"reference": Frozen(tiny_model(3), "sft-a")})
    with pytest.raises(CheckpointError, match=r"frozen model 'reference' from 'sft-a', this run loads it from 'sft-b'"):
        resume({"policy": policy, "value": value}, {"reference": Frozen(tiny_model(3), "sft-b")})
    wider = Trainable(tiny_model(0, intermediate_size=96), OptimSection())
    with pytest.raises(CheckpointError, match=r"step_000004/policy: tensor .*mlp.* has shape"):
        resume({"policy": wider, "value": value}, {"reference": Frozen(tiny_model(3), "sft-a")})
    # Nothing was overwritten by the refused attempts.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000003", "step_000004"]


def test_trainable_models_train_in_training_mode_from_the_first_step(tmp_path: Path) -> None:
    """A loaded model comes in eval mode; activation checkpointing (and LoRA dropout) only act in training mode,
    so the engine must switch its trainable models to it before the first step, not after the first evaluation."""
    policy = tiny_model().eval()
    policy.set_gradient_checkpointing(True)
    reference = tiny_model(5).train()
    engine = Engine({"policy": Trainable(policy, OptimSection(lr=1e-2))}, train_cfg(), run_dir=tmp_path,
                    total_steps=1, frozen={"reference": Frozen(reference, source="runs/sft/final")},
                    stream=open(os.devnull, "w"))  # noqa: SIM115
    assert policy.training and not reference.training
    recomputed = []
    layer = policy.model.layers[0]
    layer.register_forward_pre_hook(lambda module, args: recomputed.append(torch.is_grad_enabled()))

    def loss_fn(models: Models, batch: Any, n: int) -> tuple[torch.Tensor, dict]:
        assert models["policy"].training
        return lm_loss(Models({"model": models["policy"]}), batch, n)

    engine.step(next(iter(step_batches(examples(8), train_cfg())))[0:1], loss_fn)
    # Checkpointed: the layer runs once without storing activations, and again in backward to recompute them.
    assert len(recomputed) == 2
