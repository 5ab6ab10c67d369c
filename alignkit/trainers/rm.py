"""Reward model: a scalar head on the last token, trained with the Bradley-Terry loss on preference pairs.

The model starts from an SFT or base checkpoint: its decoder is kept, its LM head replaced by `score` (one
number per token, read at the conversation's last token). Each step scores every pair's chosen and rejected
conversations in one forward ([2B, T]) and minimises -log sigmoid(r_chosen - r_rejected - margin), plus the
optional centering term. The export is an HF `LlamaForSequenceClassification` directory (see
`alignkit/rewards/scoring.py`) that `alignkit score`, PPO and `transformers` load.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.checkpoint.hf import checkpoint_kind, read_hf_config
from alignkit.data import SharedPromptBatch
from alignkit.data.pairs import PairItem, PairMicroBatch, collate_pairs, count_pairs
from alignkit.engine import Models
from alignkit.errors import ConfigError
from alignkit.losses import bradley_terry_loss
from alignkit.model import DTYPES, LlamaForCausalLM
from alignkit.model.llama import LlamaForScore
from alignkit.rewards.scoring import last_token_rewards, score_model_from_causal_lm
from alignkit.tokenizer import Tokenizer, set_chat_template
from alignkit.trainers.common import RunResult, build_model, load_tokenizer, setup
from alignkit.trainers.configs import LoRASection, ModelSection
from alignkit.trainers.preference_configs import RMConfig
from alignkit.trainers.preference_data import load_preference_data, pack_capacity
from alignkit.trainers.stage import train_stage

Config = RMConfig


def build_reward_model(section: ModelSection, tokenizer: Tokenizer | None, *, device: torch.device,
                       head_init: str = "zero") -> tuple[LlamaForScore, Tokenizer]:
    """A reward model from `model.path`: a score checkpoint continues training; a language model (HF, .gguf,
    run directory) gets a new score head on its decoder."""
    if section.path is not None:
        from alignkit.checkpoint import resolve_model_path

        resolved = resolve_model_path(section.path) if Path(section.path).exists() else None
        if resolved is not None and resolved.is_dir() and checkpoint_kind(read_hf_config(resolved)[1]) == "score":
            from alignkit.checkpoint import load_pretrained

            model, own = load_pretrained(resolved, dtype=DTYPES[section.dtype], device=device, kind="score")
            assert isinstance(model, LlamaForScore)
            tokenizer = tokenizer or own
            if tokenizer is None:
                raise ConfigError(f"model.path {section.path} has no tokenizer.json; set `tokenizer` to a tokenizer path.")
            if section.gradient_checkpointing:
                model.set_gradient_checkpointing(section.gradient_checkpointing)
            return model, tokenizer
    lm, tokenizer = build_model(section, tokenizer, device=device)
    assert isinstance(lm, LlamaForCausalLM)
    return score_model_from_causal_lm(lm, head_init=head_init), tokenizer


def freeze_all_but_last(model: LlamaForScore, num_layers: int) -> None:
    """Train only the last `num_layers` decoder layers, the final norm and the score head.

    The frozen layers run without building an autograd graph (nothing below the first trainable layer needs a
    gradient), so a step costs about one forward plus the top layers' backward: the cheap way to fit a reward
    model on a CPU.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    trainable: list[nn.Module] = [model.score, model.model.norm]
    if num_layers:
        trainable += list(model.model.layers[-num_layers:])
    for module in trainable:
        for param in module.parameters():
            param.requires_grad_(True)


def add_trainable(model: LlamaForScore, lora: LoRASection, train_last_layers: int | None) -> None:
    if lora.enabled:
        from alignkit.model.lora import apply_lora

        # modules_to_save defaults to ["score"] for a score model: the new head trains fully and ships with the adapter.
        apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    elif train_last_layers is not None:
        freeze_all_but_last(model, train_last_layers)


def pair_rewards(model: nn.Module, micro: PairMicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards [B], rejected rewards [B]) in fp32 from one forward over the micro-batch."""
    batch = micro.batch
    if isinstance(batch, SharedPromptBatch):
        values = model(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
        values = values.flatten().float()
        return values[batch.chosen_last], values[batch.rejected_last]
    rewards = last_token_rewards(model, batch.input_ids, batch.attention_mask, batch.position_ids)
    return rewards[: batch.num_pairs], rewards[batch.num_pairs :]


def make_loss_fn(center_rewards_coefficient: float, device: torch.device
                 ) -> Callable[[Models, PairMicroBatch, int], tuple[torch.Tensor, dict[str, Any]]]:
    def loss_fn(models: Models, micro: PairMicroBatch, num_pairs: int) -> tuple[torch.Tensor, dict[str, Any]]:
        micro = micro.to(device)
        chosen, rejected = pair_rewards(models["model"], micro)
        loss, metrics = bradley_terry_loss(chosen, rejected, margin=micro.margin,
                                           center_rewards_coefficient=center_rewards_coefficient)
        # bradley_terry_loss averages over this micro-batch; the engine wants the sum over the step's pairs.
        return loss * (micro.num_pairs / num_pairs), metrics

    return loss_fn


def make_evaluate_batch(center_rewards_coefficient: float, device: torch.device
                        ) -> Callable[[Models, PairMicroBatch], tuple[dict[str, float], int]]:
    """Held-out Bradley-Terry loss, accuracy (r_chosen > r_rejected), margin and mean reward of one micro-batch, as
    sums over its pairs (divided by all pairs of every batch and rank by `sharded_eval`)."""

    def evaluate_batch(models: Models, micro: PairMicroBatch) -> tuple[dict[str, float], int]:
        micro = micro.to(device)
        chosen, rejected = pair_rewards(models["model"], micro)
        loss, _ = bradley_terry_loss(chosen, rejected, margin=micro.margin,
                                     center_rewards_coefficient=center_rewards_coefficient)
        n = micro.num_pairs
        return {"loss": float(loss) * n, "accuracy": float((chosen > rejected).sum()),
                "margin": float((chosen - rejected).sum()), "mean_reward": float((chosen + rejected).sum()) / 2}, n

    return evaluate_batch


def train(cfg: RMConfig) -> RunResult:
    info = setup(cfg.train)

    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    model, tokenizer = build_reward_model(cfg.model, tokenizer, device=info.device, head_init=cfg.rm.head_init)
    set_chat_template(tokenizer, cfg.chat_template)
    add_trainable(model, cfg.lora, cfg.rm.train_last_layers)

    # Data: validated and tokenised before the run directory is touched (a bad record leaves nothing behind).
    data = load_preference_data(cfg.data, tokenizer, info, max_prompt_length=cfg.rm.max_prompt_length,
                                strict=cfg.rm.strict, margin_field=cfg.rm.margin_field)
    capacity = pack_capacity(cfg.data, info.device)

    def collate(items: list[PairItem]) -> PairMicroBatch:
        return collate_pairs(items, pad_id=tokenizer.pad_token_id, with_margin=data.has_margin, pack_capacity=capacity)

    coefficient = cfg.rm.center_rewards_coefficient
    return train_stage(cfg, info, model, tokenizer, train_items=data.train, eval_items=data.eval, collate=collate,
                       loss_fn=make_loss_fn(coefficient, info.device),
                       evaluate_batch=make_evaluate_batch(coefficient, info.device), count_fn=count_pairs,
                       count_unit="pairs", data_stats=data.stats)
