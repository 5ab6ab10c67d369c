"""DPO family: preference optimisation on pairs (DPO, cDPO, robust, hinge, IPO, SimPO, ORPO, + an NLL term).

Each step runs ONE forward over the pairs' chosen and rejected conversations concatenated ([2B, T]) and asks the
model for logits only at response positions, so the LM head and log-softmax never touch the prompt or padding.
Per-sequence log-probs go to a pure loss from `alignkit.losses` (`build_preference_loss`).

The reference log-probs (for the losses that need one) come from:
- `reference.path` unset, LoRA: the policy's own weights with the adapter disabled (no second copy);
- `reference.path` unset, full fine-tuning: the starting policy. Precomputed (the default) it is the policy
  itself before the first step, again with no copy; on the fly it is a frozen copy of the starting weights;
- `reference.path` set: that model, loaded once (and freed after precomputing).
Precomputed values are cached in `run_dir/reference_logps.safetensors` with a fingerprint of the data and the
reference, so a resumed run reuses them. Reference-free losses (simpo, orpo) never build or load a reference.

Likelihood diagnostics: with a reference, every step logs `logps/chosen_delta` and `logps/rejected_delta`
(mean policy minus reference log-prob, summed over the response) and their per-token versions. When both deltas
stay negative for `dpo.displacement_window` steps in a row the log gets a warning line: the margin grows only
because rejected falls faster than chosen (likelihood displacement, docs/concepts/dpo.md).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from alignkit.checkpoint.files import save_safetensors
from alignkit.data import SharedPromptBatch
from alignkit.data.pairs import PairItem, PairMicroBatch, collate_pairs, count_pairs
from alignkit.engine import DistInfo, Frozen, Models, autocast
from alignkit.engine import distributed as dist
from alignkit.errors import ConfigError
from alignkit.losses import (
    IGNORE_INDEX,
    PreferenceLogps,
    PreferenceLossFn,
    build_preference_loss,
    logits_metrics,
    requires_reference,
    segment_ids_from_mask,
    sequence_lengths,
    sequence_logprobs,
    token_logprobs,
)
from alignkit.model import DTYPES
from alignkit.tokenizer import set_chat_template
from alignkit.trainers.common import RunResult, add_lora, build_model, load_tokenizer, setup
from alignkit.trainers.preference_configs import DPOConfig
from alignkit.trainers.preference_data import load_preference_data, pack_capacity
from alignkit.trainers.stage import train_stage

Config = DPOConfig
logger = logging.getLogger(__name__)
REFERENCE_CACHE = "reference_logps.safetensors"


# ---------------------------------------------------------------------------------------------- log-probs


def sequence_logps(model: nn.Module, micro: PairMicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs [2B], response lengths [2B], response logits [N, V]) from one forward over chosen + rejected.

    Rows [0, B) are chosen, [B, 2B) rejected; the logits are flattened row-major, so the first
    sum(lengths[:B]) of them belong to the chosen responses.
    """
    batch = micro.batch
    if isinstance(batch, SharedPromptBatch):
        # Pairs packed with a shared prompt: logits at each response token's source position, chosen first.
        logits = model(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                       logits_index=batch.source_index)  # [N, V]
        targets, segments = batch.target_ids, batch.segment_ids
    else:
        mask = batch.labels != IGNORE_INDEX  # [2B, T], response tokens only (labels are already shifted)
        # Right padding: plain causal attention is exact for every real token and keeps SDPA's fused kernel.
        logits = model(batch.input_ids, position_ids=batch.position_ids, logits_mask=mask)  # [N, V]
        targets, segments = batch.labels[mask], segment_ids_from_mask(mask)
    token_logps = token_logprobs(logits, targets)  # [N], fp32
    rows = 2 * batch.num_pairs
    return sequence_logprobs(token_logps, segments, rows), sequence_lengths(segments, rows), logits


class Reference:
    """Reference log-probs on demand: a frozen model, or the policy with its LoRA adapter disabled."""

    def __init__(self, model: nn.Module, *, adapter_disabled: bool, description: str) -> None:
        self.model = model
        self.adapter_disabled = adapter_disabled
        self.description = description

    def release(self) -> None:
        """Once every pair carries precomputed values the model is not needed: drop it (a separately loaded
        reference frees its memory; the policy itself is unaffected)."""
        self.model = None  # type: ignore[assignment]

    @torch.no_grad()
    def logps(self, micro: PairMicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen [B], rejected [B]) summed response log-probs under the reference."""
        if self.adapter_disabled:
            from alignkit.model.lora import disable_adapters

            with disable_adapters(self.model):
                logps, _, _ = sequence_logps(self.model, micro)
        else:
            logps, _, _ = sequence_logps(self.model, micro)
        return logps[: micro.num_pairs], logps[micro.num_pairs :]


def build_reference(cfg: DPOConfig, policy: nn.Module, device: torch.device) -> Reference:
    """The reference for `cfg` (only called for losses that need one; see the module docstring)."""
    if cfg.reference.path is not None:
        section = copy.copy(cfg.model)
        section.path, section.init, section.gradient_checkpointing = cfg.reference.path, None, False
        model, _ = build_model(section, None, device=device)
        model.eval().requires_grad_(False)
        return Reference(model, adapter_disabled=False, description=f"{cfg.reference.path}:{DTYPES[section.dtype]}")
    start = f"{cfg.model.path or 'init'}:{cfg.model.dtype}"
    if cfg.lora.enabled:
        return Reference(policy, adapter_disabled=True, description=f"{start}:adapter-disabled")
    if cfg.reference.precompute:
        # The policy before its first update IS the reference: precomputing with it needs no copy.
        return Reference(policy, adapter_disabled=False, description=f"{start}:initial-policy")
    frozen = copy.deepcopy(policy).eval().requires_grad_(False)
    return Reference(frozen, adapter_disabled=False, description=f"{start}:frozen-copy")


def _fingerprint(items: Sequence[PairItem], reference: Reference, precision: str) -> str:
    digest = hashlib.sha256(f"{reference.description}|{precision}".encode())
    for item in items:
        ex = item.example
        digest.update(json.dumps([ex.prompt_ids, ex.chosen_ids, ex.rejected_ids]).encode())
    return digest.hexdigest()


def precompute_reference(
    splits: dict[str, list[PairItem]],
    reference: Reference,
    collate: Callable[[list[PairItem]], PairMicroBatch],
    *,
    run_dir: Path,
    batch_size: int,
    precision: str,
    info: DistInfo,
) -> bool:
    """Fill each item's reference log-probs, from the run directory's cache when its fingerprint matches.

    Ranks split the work (pairs sorted by length, so batches carry little padding) and share the results.
    Returns True when the values came from the cache.
    """
    path = run_dir / REFERENCE_CACHE
    fingerprints = {name: _fingerprint(items, reference, precision) for name, items in splits.items()}
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
            if all(stored.get(name) == fp for name, fp in fingerprints.items()):
                for name, items in splits.items():
                    chosen, rejected = f.get_tensor(f"{name}/chosen").tolist(), f.get_tensor(f"{name}/rejected").tolist()
                    for item, c, r in zip(items, chosen, rejected):
                        item.reference_chosen, item.reference_rejected = c, r
                return True
    tensors: dict[str, torch.Tensor] = {}
    was_training = reference.model.training
    reference.model.eval()
    for name, items in splits.items():
        order = sorted(range(len(items)), key=lambda i: len(items[i].example))
        mine = order[info.rank :: info.world_size]
        values: dict[int, tuple[float, float]] = {}
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            micro = collate([items[i] for i in chunk]).to(info.device)
            with autocast(precision, info.device):
                chosen, rejected = reference.logps(micro)
            for i, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                values[i] = (c, r)
        for part in dist.all_gather_object(values):
            values.update(part)  # type: ignore[arg-type]
        for i, item in enumerate(items):
            item.reference_chosen, item.reference_rejected = values[i]
        tensors[f"{name}/chosen"] = torch.tensor([values[i][0] for i in range(len(items))], dtype=torch.float32)
        tensors[f"{name}/rejected"] = torch.tensor([values[i][1] for i in range(len(items))], dtype=torch.float32)
    reference.model.train(was_training)
    if info.is_main:
        save_safetensors(tensors, path, metadata=fingerprints)
    dist.barrier()
    return False


# ---------------------------------------------------------------------------------------------- diagnostics


class LikelihoodMonitor:
    """Warns once per episode when chosen and rejected log-probs both fall below the reference.

    Rule: the step's logps/chosen_delta and logps/rejected_delta (policy minus reference, the means over every pair
    of the step on every rank, as logged) are both negative for `window` consecutive optimizer steps. The warning
    is printed again only after a step where the condition broke and then held for another `window` steps. Its
    streak is part of every checkpoint, so a resumed run warns exactly when the uninterrupted one would.
    """

    def __init__(self, window: int, *, enabled: bool = True) -> None:
        self.window = window
        self.enabled = enabled
        self.history: deque[bool] = deque(maxlen=window)
        self.warned = False
        self.warnings: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "warned": self.warned, "warnings": list(self.warnings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque((bool(v) for v in state["history"]), maxlen=self.window)
        self.warned, self.warnings = bool(state["warned"]), list(state["warnings"])

    def observe(self, row: dict[str, Any]) -> None:
        """One optimizer step's metrics row (ignored when it has no reference deltas)."""
        if "logps/chosen_delta" not in row:
            return
        chosen, rejected = row["logps/chosen_delta"], row["logps/rejected_delta"]
        both_fall = chosen < 0 and rejected < 0
        self.history.append(both_fall)
        if not both_fall:
            self.warned = False
        elif len(self.history) == self.window and all(self.history) and not self.warned:
            self.warned = True
            text = (
                f"warning: likelihood displacement: logps/chosen_delta and logps/rejected_delta (policy minus "
                f"reference log-prob) have both been negative for the last {self.window} steps (now {chosen:.3f} "
                f"and {rejected:.3f}); the margin grows only because rejected falls faster than chosen. Consider "
                "dpo.rpo_alpha (an NLL term on chosen), a lower optim.lr or fewer steps (docs/concepts/dpo.md)."
            )
            self.warnings.append(f"step {row['step']}: {text}")
            if self.enabled:
                logger.warning(text)


def delta_metrics(logps: PreferenceLogps) -> dict[str, torch.Tensor]:
    """Policy minus reference log-prob of chosen and rejected: summed over the response, and per token."""
    assert logps.reference_chosen is not None and logps.reference_rejected is not None
    assert logps.chosen_lengths is not None and logps.rejected_lengths is not None
    with torch.no_grad():
        chosen = (logps.policy_chosen - logps.reference_chosen).float()
        rejected = (logps.policy_rejected - logps.reference_rejected).float()
        return {
            "logps/chosen_delta": chosen.mean(),
            "logps/rejected_delta": rejected.mean(),
            "logps/chosen_delta_per_token": (chosen / logps.chosen_lengths.clamp(min=1)).mean(),
            "logps/rejected_delta_per_token": (rejected / logps.rejected_lengths.clamp(min=1)).mean(),
        }


# ---------------------------------------------------------------------------------------------- loss and eval


def pair_logps(model: nn.Module, micro: PairMicroBatch, reference: Reference | None
               ) -> tuple[PreferenceLogps, torch.Tensor]:
    """The policy's (and reference's) per-sequence log-probs of a micro-batch, and the response logits [N, V]."""
    logps, lengths, logits = sequence_logps(model, micro)
    b = micro.num_pairs
    ref_chosen, ref_rejected = micro.reference_chosen, micro.reference_rejected
    if ref_chosen is None and reference is not None:
        ref_chosen, ref_rejected = reference.logps(micro)
    return PreferenceLogps(
        policy_chosen=logps[:b], policy_rejected=logps[b:], reference_chosen=ref_chosen,
        reference_rejected=ref_rejected, chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
    ), logits


def make_loss_fn(preference_loss: PreferenceLossFn, reference: Reference | None, device: torch.device
                 ) -> Callable[[Models, PairMicroBatch, int], tuple[torch.Tensor, dict[str, Any]]]:
    def loss_fn(models: Models, micro: PairMicroBatch, num_pairs: int) -> tuple[torch.Tensor, dict[str, Any]]:
        micro = micro.to(device)
        logps, logits = pair_logps(models["model"], micro, reference)
        losses, metrics = preference_loss(logps)  # [B] per-pair losses
        assert logps.chosen_lengths is not None
        num_chosen_tokens = int(logps.chosen_lengths.sum())
        metrics.update(logits_metrics(logits[:num_chosen_tokens], logits[num_chosen_tokens:]))
        if logps.reference_chosen is not None:
            metrics.update(delta_metrics(logps))
        # Sum over this micro-batch's pairs / the step's pairs: the step's mean whatever the accumulation.
        return losses.sum() / num_pairs, metrics

    return loss_fn


def make_evaluate_batch(preference_loss: PreferenceLossFn, reference: Reference | None, device: torch.device
                        ) -> Callable[[Models, PairMicroBatch], tuple[dict[str, float], int]]:
    """Held-out loss and the training metrics (rewards/accuracies, margins, log-probs, deltas) of one micro-batch,
    as sums over its pairs."""

    def evaluate_batch(models: Models, micro: PairMicroBatch) -> tuple[dict[str, float], int]:
        micro = micro.to(device)
        logps, _ = pair_logps(models["model"], micro, reference)
        losses, metrics = preference_loss(logps)
        metrics = {"loss": losses.float().mean(), **metrics}
        if logps.reference_chosen is not None:
            metrics.update(delta_metrics(logps))
        n = micro.num_pairs
        return {key: float(value) * n for key, value in metrics.items()}, n

    return evaluate_batch


# ---------------------------------------------------------------------------------------------- the stage


def check_reference_config(cfg: DPOConfig, names: list[str]) -> bool:
    """Whether the losses need a reference; a reference given to a reference-free loss is a ConfigError."""
    needs = requires_reference(names)
    if not needs and cfg.reference.path is not None:
        raise ConfigError(
            f"dpo.loss {names} is reference-free (SimPO / ORPO compare the policy with itself), but reference.path "
            f"is set to {cfg.reference.path!r}; remove reference.path, or pick a loss that uses a reference "
            "(sigmoid, ipo, robust, hinge)."
        )
    return needs


def train(cfg: DPOConfig) -> RunResult:
    info = setup(cfg.train)
    names, weights = cfg.dpo.terms()
    preference_loss = build_preference_loss(names, weights, **cfg.dpo.hyperparameters())
    needs_reference = check_reference_config(cfg, names)

    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    model, tokenizer = build_model(cfg.model, tokenizer, device=info.device)
    set_chat_template(tokenizer, cfg.chat_template)
    add_lora(model, cfg.lora)

    # Data: validated and tokenised before the run directory is touched (a bad record leaves nothing behind).
    data = load_preference_data(cfg.data, tokenizer, info, max_prompt_length=cfg.dpo.max_prompt_length,
                                strict=cfg.dpo.strict)

    capacity = pack_capacity(cfg.data, info.device)

    def collate(items: list[PairItem]) -> PairMicroBatch:
        return collate_pairs(items, pad_id=tokenizer.pad_token_id, pack_capacity=capacity)

    reference = build_reference(cfg, model, info.device) if needs_reference else None
    # A separate reference model used during training is frozen in the engine (its source is checked on resume);
    # a LoRA reference is the policy with its adapters disabled, and a precomputed one is gone before step 1.
    frozen = {}
    if reference is not None and not reference.adapter_disabled and not cfg.reference.precompute:
        frozen["reference"] = Frozen(reference.model, source=reference.description)

    def precompute(run_dir: Path) -> None:
        """The policy before its first update (or reference.path) scores every pair once; the values are cached in
        the run directory, so a resumed run reuses them, and every item carries them from here on."""
        if reference is not None and cfg.reference.precompute:
            precompute_reference({"train": data.train, "eval": data.eval}, reference, collate, run_dir=run_dir,
                                 batch_size=cfg.train.micro_batch_size, precision=cfg.train.precision, info=info)
            reference.release()

    monitor = LikelihoodMonitor(cfg.dpo.displacement_window, enabled=info.is_main)
    result = train_stage(cfg, info, model, tokenizer, train_items=data.train, eval_items=data.eval, collate=collate,
                         loss_fn=make_loss_fn(preference_loss, reference, info.device),
                         evaluate_batch=make_evaluate_batch(preference_loss, reference, info.device),
                         count_fn=count_pairs, count_unit="pairs", data_stats=data.stats, frozen=frozen,
                         state={"likelihood_monitor": monitor}, on_step=monitor.observe, prepare=precompute)
    if info.is_main and monitor.warnings:
        (result.run_dir / "warnings.txt").write_text("".join(w + "\n" for w in monitor.warnings))
    return result
