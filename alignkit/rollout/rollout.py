"""What every RL trainer does between two optimizer phases: prompts -> G completions each -> rewards -> episodes.

    rollout = generate_rollout(policy, tokenizer, prompts, params, group_size=G)    # one prefill per prompt
    scores = score_rollout(rollout, functions, weights, fields)                      # rewards per completion
    batches = episode_batches(rollout, micro_batch_size, advantages=..., old_logps=..., ref_logps=...)
    logps, entropy = completion_logprobs(model, batch, temperature=T)               # in the loss function
    values = completion_values(critic, batch)                                       # PPO's critic, V_t per token

The log-probs of a completion are those of the logits divided by the sampling temperature (TRL's convention): the
distribution the tokens were drawn from when no top-k / top-p / min-p filter is active. `generate` returns exactly
those (`Completion.logprobs`), so the rollout's own log-probs can serve as the old policy's in the importance
ratio; with a filter (or bf16 decoding) they are recomputed with a training forward instead.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from alignkit.generation import Completion, SamplingParams, generate
from alignkit.generation.packed import packed_linears
from alignkit.losses.logprobs import entropy_from_logits, token_logprobs
from alignkit.rewards.verifiable import RewardFn, score_completions


@dataclass
class Rollout:
    """The completions of one iteration on this rank: G consecutive completions per prompt."""

    prompt_ids: list[list[int]]  # one per prompt
    completions: list[Completion]  # prompt i's completions are [i * G, (i + 1) * G)
    group_size: int

    @property
    def completion_ids(self) -> list[list[int]]:
        return [c.token_ids for c in self.completions]

    def prompt_of(self, index: int) -> list[int]:
        return self.prompt_ids[index // self.group_size]

    def groups(self, indices: Sequence[int]) -> Rollout:
        """The rollout of the prompts `indices` only (with their G completions each), in that order."""
        g = self.group_size
        return Rollout([self.prompt_ids[i] for i in indices],
                       [c for i in indices for c in self.completions[i * g : (i + 1) * g]], g)

    def __add__(self, other: Rollout) -> Rollout:
        assert self.group_size == other.group_size, "rollouts of different group sizes"
        return Rollout(self.prompt_ids + other.prompt_ids, self.completions + other.completions, self.group_size)


@contextlib.contextmanager
def sampling_model(policy: nn.Module, *, precision: str, device: torch.device, rows: int) -> Iterator[nn.Module]:
    """The model an iteration's rollouts sample from (`generate_rollout(model, ...)`), its CPU weights packed once
    for every draw of the iteration (`rows`: the sequences a draw decodes together).

    In a bf16 run on CPU it is a bf16 copy of the policy, dropped at the end of the block: the run's forwards
    compute under bf16 autocast (TRL's generation runs under the same autocast), and on two CPU cores a bf16 decode
    step is ~1.6x faster than an fp32 one. The old policy's log-probs of a bf16 run come from a training forward
    of the live policy, never from the sampler, so the first optimizer step's ratio stays 1. Otherwise (fp32, GPU)
    it is the live policy itself."""
    model = policy
    if precision == "bf16" and device.type == "cpu" and any(
        p.dtype != torch.bfloat16 for p in policy.parameters() if p.is_floating_point()
    ):
        model = _cast_copy(policy, torch.bfloat16)
    with packed_linears(model, batch_size=rows):
        yield model


def _cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen eval-mode copy of `module` with its floating-point parameters and buffers in `dtype` (tied weights
    stay tied), built without an intermediate full-precision copy."""
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in memo:
                cast = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach().clone()
                memo[id(tensor)] = nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) else cast
    return copy.deepcopy(module, memo).eval()


def generate_rollout(policy: nn.Module, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], params: SamplingParams,
                     *, group_size: int) -> Rollout:
    """G = group_size samples per prompt from the live policy (each prompt prefilled once and shared)."""
    params = SamplingParams(**{f.name: getattr(params, f.name) for f in fields(params)} | {"n": group_size})
    completions = generate(policy, prompt_ids, params, tokenizer=tokenizer)  # type: ignore[arg-type]
    return Rollout([list(p) for p in prompt_ids], completions, group_size)


def score_rollout(rollout: Rollout, functions: Sequence[RewardFn], weights: Sequence[float], prompts: Sequence[Any],
                  fields_by_prompt: Mapping[str, Sequence[Any]]) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """(rewards [N] in float64, each function's values) of a rollout; `prompts` and every field list have one entry per
    prompt and are repeated for its G completions, as TRL's reward functions expect."""
    g = rollout.group_size
    texts = [c.text if c.text is not None else "" for c in rollout.completions]
    repeated = {key: [value for value in values for _ in range(g)] for key, values in fields_by_prompt.items()}
    repeated["completion_ids"] = rollout.completion_ids
    totals, values = score_completions(functions, weights, [p for p in prompts for _ in range(g)], texts, repeated,
                                       group_size=g)
    return torch.tensor(totals, dtype=torch.float64), values


@dataclass
class EpisodeBatch:
    """A micro-batch of episodes for a training forward: prompt + completion, right padded.

    `targets` / `mask` [E, C] are the completion tokens and which of them are real; the per-token tensors
    (`old_logps`, `ref_logps`, `advantages`, a per-sequence advantage is [E, 1]; PPO's `old_values` and
    `returns`) line up with them.
    """

    input_ids: torch.Tensor  # [E, L]; shared prompts: [R, L], one row per prompt (see below)
    logits_mask: torch.Tensor  # [E, L] positions whose next token is a completion token; shared: [R, L]
    targets: torch.Tensor  # [E, C]
    mask: torch.Tensor  # [E, C] bool
    advantages: torch.Tensor  # [E, 1] or [E, C]
    old_logps: torch.Tensor | None = None  # [E, C]
    ref_logps: torch.Tensor | None = None  # [E, C]
    old_values: torch.Tensor | None = None  # [E, C] the critic's values at rollout time (PPO)
    returns: torch.Tensor | None = None  # [E, C] the critic's targets (PPO)
    # Shared prompts: the completions of one prompt follow it in one row ([prompt, c1, c2, ...]), each seeing the
    # prompt and itself (a 4-D mask, positions counting on from the prompt), so the prompt runs once per group.
    position_ids: torch.Tensor | None = None  # [R, L]
    attention_mask: torch.Tensor | None = None  # bool [R, 1, L, L]
    logits_index: torch.Tensor | None = None  # [N] flat position predicting each present completion token
    present: torch.Tensor | None = None  # [E, C] completion tokens that exist (the order of logits_index)

    @property
    def shared(self) -> bool:
        return self.logits_index is not None

    @property
    def num_sequences(self) -> int:
        return int(self.targets.shape[0])

    def present_tokens(self) -> torch.Tensor:
        """[E, C] bool: the completion tokens that exist (a real one, or one under a dropped completion)."""
        if self.present is not None:
            return self.present
        return torch.arange(self.targets.shape[1], device=self.targets.device)[None, :] < (
            self.logits_mask.sum(-1, keepdim=True))

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def to(self, device: torch.device | str) -> EpisodeBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return EpisodeBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    def select(self, rows: Sequence[int] | torch.Tensor) -> EpisodeBatch:
        """The episodes `rows`, in that order, with the padding columns no selected sequence needs cut off the
        input (PPO's shuffled minibatches of one whole-rollout batch). Per-token tensors keep their width C."""
        if self.shared:
            raise ValueError("EpisodeBatch.select needs one row per episode; build the batch with share_prompts=False.")
        index = torch.as_tensor(rows, dtype=torch.long)
        # A row's input ends one past its last completion position (that position predicts the last token).
        ends = self.logits_mask[index].long().cumsum(-1).argmax(-1) + 2
        width = int(ends.max()) if index.numel() else 0
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        out = {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in picked.items()}
        out["input_ids"], out["logits_mask"] = out["input_ids"][:, :width], out["logits_mask"][:, :width]
        return EpisodeBatch(**out)


def _pad(rows: Sequence[Sequence[float]], width: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def _episode_rows(rollout: Rollout, rows: range, pad_id: int) -> dict[str, torch.Tensor]:
    """Input of the episodes `rows`, one right-padded row each: prompt + completion."""
    sequences = [rollout.prompt_of(i) + rollout.completions[i].token_ids for i in rows]
    length = max(len(s) for s in sequences)
    logits_mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for j, i in enumerate(rows):
        p, c = len(rollout.prompt_of(i)), len(rollout.completions[i].token_ids)
        logits_mask[j, p - 1 : p - 1 + c] = True
    return {"input_ids": _pad(sequences, length, pad_id, torch.long), "logits_mask": logits_mask}


def _shared_rows(rollout: Rollout, rows: range, pad_id: int) -> dict[str, torch.Tensor]:
    """Input of the episodes `rows` with each prompt once: one packed row per prompt, its completions after it."""
    g = rollout.group_size
    groups: list[list[int]] = []
    for i in rows:
        if groups and groups[-1][0] // g == i // g:
            groups[-1].append(i)
        else:
            groups.append([i])
    sequences, positions, segments, sources = [], [], [], []
    width = max(len(rollout.prompt_of(m[0])) + sum(len(rollout.completions[i].token_ids) for i in m) for m in groups)
    for r, members in enumerate(groups):
        prompt = rollout.prompt_of(members[0])
        p = len(prompt)
        ids, pos, seg = list(prompt), list(range(p)), [0] * p  # segment 0: the prompt; k: the k-th completion
        for k, i in enumerate(members, start=1):
            completion = rollout.completions[i].token_ids
            start = len(ids)
            # Token j of this completion is predicted at the prompt's last position (j = 0) or at its token j - 1.
            sources += [r * width + (p - 1 if j == 0 else start + j - 1) for j in range(len(completion))]
            ids += completion
            pos += range(p, p + len(completion))
            seg += [k] * len(completion)
        sequences.append(ids)
        positions.append(pos)
        segments.append(seg)
    input_ids = _pad(sequences, width, pad_id, torch.long)
    position_ids = _pad(positions, width, 0, torch.long)
    segment = _pad(segments, width, -1, torch.long)  # -1: padding
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    visible = causal & (seg_q >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    visible |= torch.eye(width, dtype=torch.bool)  # padding sees itself: no all-masked row (NaN)
    logits_mask = torch.zeros(len(groups), width, dtype=torch.bool)
    logits_mask.view(-1)[torch.tensor(sources, dtype=torch.long)] = True
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": visible[:, None],
            "logits_index": torch.tensor(sources, dtype=torch.long), "logits_mask": logits_mask}


def episode_batches(rollout: Rollout, micro_batch_size: int, *, advantages: torch.Tensor,
                    loss_mask: torch.Tensor | None = None, old_logps: torch.Tensor | None = None,
                    ref_logps: torch.Tensor | None = None, pad_id: int = 0,
                    share_prompts: bool = False) -> list[EpisodeBatch]:
    """The rollout's episodes in micro-batches of `micro_batch_size`, in order.

    `advantages` is [N] (per sequence) or [N, C]; `loss_mask` [N] False drops a completion from the loss (a
    truncated one, under mask_truncated_completions); `old_logps` / `ref_logps` are [N, C] padded like the
    completions (C = the longest completion). `share_prompts`: the completions of one prompt in a micro-batch
    share one row and one pass over their prompt (GRPO's G completions per prompt: the prompt's tokens run once
    instead of G times); the log-probs equal the one-row-per-episode layout's up to rounding.
    """
    n = len(rollout.completions)
    width = max((len(c.token_ids) for c in rollout.completions), default=0)
    targets = _pad(rollout.completion_ids, width, 0, torch.long)
    mask = torch.arange(width)[None, :] < torch.tensor([len(c.token_ids) for c in rollout.completions])[:, None]
    if loss_mask is not None:
        mask = mask & loss_mask[:, None].bool()
    per_token = advantages if advantages.ndim == 2 else advantages[:, None]
    batches = []
    for start in range(0, n, micro_batch_size):
        rows = range(start, min(start + micro_batch_size, n))
        part = slice(start, rows.stop)
        if share_prompts:
            lengths = torch.tensor([len(rollout.completions[i].token_ids) for i in rows])
            layout = {**_shared_rows(rollout, rows, pad_id), "present": torch.arange(width)[None, :] < lengths[:, None]}
        else:
            layout = _episode_rows(rollout, rows, pad_id)
        batches.append(EpisodeBatch(
            **layout, targets=targets[part], mask=mask[part], advantages=per_token[part].float(),
            old_logps=old_logps[part] if old_logps is not None else None,
            ref_logps=ref_logps[part] if ref_logps is not None else None,
        ))
    return batches


def completion_logprobs(model: nn.Module, batch: EpisodeBatch, *, temperature: float = 1.0,
                        with_entropy: bool = False, entropy_grad: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs [E, C], entropy [E, C] or None) of the completion tokens under `model`, from logits divided by
    `temperature`; padding positions hold 0. One forward, logits only at completion positions. The entropy is a
    metric without gradient unless `entropy_grad` (PPO's entropy bonus differentiates it)."""
    if batch.shared:
        logits = model(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                       logits_index=batch.logits_index)  # [N, V], row-major over (episode, completion)
    else:
        logits = model(batch.input_ids, logits_mask=batch.logits_mask)  # [N, V], row-major over (row, completion)
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    present = batch.present_tokens()
    flat = token_logprobs(logits, batch.targets[present])
    logps = torch.zeros(batch.targets.shape, dtype=flat.dtype, device=flat.device).masked_scatter(present, flat)
    entropy = None
    if with_entropy:
        with torch.no_grad() if not entropy_grad else contextlib.nullcontext():
            flat_entropy = entropy_from_logits(logits)
        entropy = torch.zeros(batch.targets.shape, dtype=flat_entropy.dtype,
                              device=flat_entropy.device).masked_scatter(present, flat_entropy)
    return logps, entropy


def completion_values(critic: nn.Module, batch: EpisodeBatch) -> torch.Tensor:
    """Values [E, C] of a scalar-head model (PPO's critic, `model(input_ids)` -> [E, L]) at the positions that
    predict each completion token: V_t, the expected return of the state before token t is chosen (TRL's
    `value[:, context_length - 1 : -1]`); padding positions hold 0. One forward."""
    present = batch.present_tokens()
    out = torch.zeros(batch.targets.shape, dtype=torch.float32, device=batch.targets.device)
    if batch.shared:
        values = critic(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
        return out.to(values.dtype).masked_scatter(present, values.flatten()[batch.logits_index])
    values = critic(batch.input_ids)  # [E, L]; right padding: the causal mask is exact for every real token
    return out.to(values.dtype).masked_scatter(present, values[batch.logits_mask])


def rollout_logprobs(rollout: Rollout) -> torch.Tensor:
    """[N, C] the sampling distribution's log-probs the rollout returned (padding 0)."""
    width = max((len(c.token_ids) for c in rollout.completions), default=0)
    return _pad([c.logprobs for c in rollout.completions], width, 0.0, torch.float32)


def attach_logprobs(batches: Sequence[EpisodeBatch], model: nn.Module, *, into: str, temperature: float,
                    device: torch.device, context: Callable[[], Any] | None = None) -> None:
    """Set `batch.<into>` (old_logps or ref_logps) to the completion log-probs under `model`, without gradients;
    `context` wraps each forward (the reference of a LoRA policy: its adapters disabled)."""
    with torch.no_grad():
        for batch in batches:
            with context() if context is not None else contextlib.nullcontext():
                logps, _ = completion_logprobs(model, batch.to(device), temperature=temperature)
            setattr(batch, into, logps.float().cpu())
