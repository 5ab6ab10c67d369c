"""The DPO family: losses on (chosen, rejected) pairs of per-sequence log-probabilities.

Every loss here has the same shape: `fn(logps: PreferenceLogps, *, hyperparameters) -> (losses [B], metrics)`.
`losses` is one value per pair (not yet averaged), so losses can be weighted and summed (`combine`) and a trainer
can reduce by the global number of pairs when it accumulates gradients; `metrics` are detached scalar means with
TRL's names. The derivations and when to use which are in docs/concepts/dpo.md.

Notation in the docstrings: pc, pl = policy log p(chosen), log p(rejected), summed over response tokens; rc, rl =
the same under the frozen reference model; lc, ll = response lengths in tokens;
h = (pc - rc) - (pl - rl), the difference of the implicit rewards divided by beta.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignkit.errors import ConfigError

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PreferenceLogps:
    """Per-sequence summed log-probs of the responses, each `[B]`; lengths are response token counts `[B]`.

    The reference fields are needed by the losses that measure the policy against a reference model
    (`requires_reference`), the lengths by the length-normalised ones (ipo, simpo, orpo, nll_chosen).
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor | None = None
    reference_rejected: torch.Tensor | None = None
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None

    def logratios(self, loss_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(pc - rc, pl - rl): how much more likely each response became relative to the reference."""
        if self.reference_chosen is None or self.reference_rejected is None:
            raise ValueError(
                f"The '{loss_name}' preference loss compares the policy with a reference model, but "
                "PreferenceLogps.reference_chosen / reference_rejected are None; compute them with the reference "
                "model (or pick a reference-free loss: simpo, orpo, nll_chosen)."
            )
        return self.policy_chosen - self.reference_chosen, self.policy_rejected - self.reference_rejected

    def lengths(self, loss_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lc, ll) as floats, clamped to at least 1 token as TRL does (an empty response would divide by 0)."""
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(
                f"The '{loss_name}' preference loss normalises by response length, but "
                "PreferenceLogps.chosen_lengths / rejected_lengths are None; pass the number of response tokens "
                "of each sequence (alignkit.losses.sequence_lengths)."
            )
        # At least fp32: bf16 cannot represent every length above 256.
        dtype = torch.promote_types(self.policy_chosen.dtype, torch.float32)
        return (
            self.chosen_lengths.to(dtype).clamp(min=1.0),
            self.rejected_lengths.to(dtype).clamp(min=1.0),
        )

    def mean_logps(self, loss_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(pc / lc, pl / ll): the policy's average log-prob per response token."""
        chosen_lengths, rejected_lengths = self.lengths(loss_name)
        return self.policy_chosen / chosen_lengths, self.policy_rejected / rejected_lengths


PreferenceLossFn = Callable[[PreferenceLogps], tuple[torch.Tensor, Metrics]]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (exp/log1p lose too much below that); fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_beta(beta: float, loss_name: str) -> None:
    if not beta > 0:
        raise ConfigError(f"beta for the '{loss_name}' preference loss must be positive, got {beta}.")


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, logps: PreferenceLogps) -> Metrics:
    """TRL's DPO metrics from the implicit rewards; `logps/*` are always the summed policy log-probs."""
    chosen_rewards, rejected_rewards = _upcast(chosen_rewards.detach()), _upcast(rejected_rewards.detach())
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": _upcast(logps.policy_chosen.detach()).mean(),
        "logps/rejected": _upcast(logps.policy_rejected.detach()).mean(),
    }


def _reference_rewards(logps: PreferenceLogps, beta: float, loss_name: str) -> tuple[torch.Tensor, Metrics]:
    """h and the metrics of the reference-based losses, whose implicit reward is beta * (log p - log p_ref)."""
    chosen_logratio, rejected_logratio = logps.logratios(loss_name)
    metrics = _reward_metrics(beta * chosen_logratio, beta * rejected_logratio, logps)
    return chosen_logratio - rejected_logratio, metrics


def _smoothed_logistic(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) logsigmoid(x) - eps logsigmoid(-x): the logistic loss when a fraction eps of labels is flipped."""
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def sigmoid(logps: PreferenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290); with label_smoothing eps > 0, conservative DPO.

        loss = -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)

    cDPO (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf) assumes each label is flipped with probability eps; its
    gradient vanishes at a finite margin instead of pushing h to infinity. (TRL 0.x had this as `label_smoothing` of
    loss_type "sigmoid"; TRL 1.x dropped it from "sigmoid" and kept it for "robust" and "exo_pair".)

    Example (three pairs, beta = 1): pc = [-1, -2, -2], pl = [-2, -2, -1], rc = rl = [-2, -2, -2]
    -> h = [1, 0, -1] -> loss = [-logsigmoid(1), ln 2, -logsigmoid(-1)] = [0.313262, 0.693147, 1.313262].
    Policy == reference gives h = 0 and ln 2 on every pair. Metrics: rewards/chosen = mean[1, 0, 0] = 1/3,
    rewards/rejected = mean[0, 0, 1] = 1/3, rewards/accuracies = 1/3 (only the first pair; ties count as wrong),
    rewards/margins = mean(h) = 0, logps/chosen = logps/rejected = -5/3.
    With eps = 0.1: 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262; ln 2; 0.9 * 1.313262 + 0.1 * 0.313262 = 1.213262.
    """
    _check_beta(beta, "sigmoid")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ConfigError(f"label_smoothing for the 'sigmoid' (cDPO) loss must be in [0, 0.5], got {label_smoothing}.")
    h, metrics = _reference_rewards(logps, beta, "sigmoid")
    return _smoothed_logistic(beta * h, label_smoothing), metrics


def robust(logps: PreferenceLogps, *, beta: float = 0.1, label_smoothing: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409): unbiased under label noise eps.

        loss = ((1 - eps) * -logsigmoid(beta h) + eps * logsigmoid(-beta h)) / (1 - 2 eps)

    Unlike cDPO this subtracts the flipped-label term, so in expectation over noisy labels it equals the clean
    DPO loss. eps must be below 0.5; the paper suggests 0.1 (the default here; TRL's default is 0).

    Example (sigmoid's three pairs, h = [1, 0, -1], beta = 1, eps = 0.1):
    (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8 = 0.188262; ln 2 (0.8 ln 2 / 0.8); (0.9 * 1.313262 - 0.1 * 0.313262) / 0.8
    = 1.438262. Metrics as sigmoid's.
    """
    _check_beta(beta, "robust")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing for the 'robust' loss must be in [0, 0.5), got {label_smoothing}.")
    h, metrics = _reference_rewards(logps, beta, "robust")
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * h)
    flipped = -label_smoothing * F.logsigmoid(-beta * h)
    return (clean - flipped) / (1 - 2 * label_smoothing), metrics


def hinge(logps: PreferenceLogps, *, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """SLiC-style hinge on the DPO log-ratio (Zhao et al. 2023, https://arxiv.org/abs/2305.10425), as TRL does.

        loss = relu(1 - beta h)

    Pairs whose margin already exceeds 1/beta contribute nothing. Example (sigmoid's three pairs, beta = 1):
    h = [1, 0, -1] -> [0, 1, 2].
    """
    _check_beta(beta, "hinge")
    h, metrics = _reference_rewards(logps, beta, "hinge")
    return torch.relu(1 - beta * h), metrics


def ipo(logps: PreferenceLogps, *, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17), beta playing the role of tau.

        h_avg = (pc - rc) / lc - (pl - rl) / ll
        loss  = (h_avg - 1 / (2 beta))^2

    The log-ratios are averaged per token, as TRL does (its comment: the IPO authors confirmed their results use
    this normalisation); summed log-ratios would make the squared loss grow with response length. The target margin
    1/(2 beta) is finite, so IPO does not push rejected log-probs to minus infinity. The logged rewards stay
    beta * (summed log-ratio), as in TRL.

    Example (sigmoid's three pairs, beta = 0.5 so the target is 1, lc = [1, 2, 1], ll = [1, 1, 2]):
    chosen log-ratios [1, 0, 0] / lc = [1, 0, 0], rejected [0, 0, 1] / ll = [0, 0, 0.5] -> h_avg = [1, 0, -0.5]
    -> loss = [0, 1, 2.25]; rewards/chosen = 0.5 * mean[1, 0, 0] = 1/6.
    """
    _check_beta(beta, "ipo")
    _, metrics = _reference_rewards(logps, beta, "ipo")
    chosen_logratio, rejected_logratio = logps.logratios("ipo")
    chosen_lengths, rejected_lengths = logps.lengths("ipo")
    h_avg = chosen_logratio / chosen_lengths - rejected_logratio / rejected_lengths
    return (h_avg - 1 / (2 * beta)) ** 2, metrics


def simpo(logps: PreferenceLogps, *, beta: float = 2.0, simpo_gamma: float = 0.5) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734): reference-free, length-normalised.

        loss = -logsigmoid(beta * (pc / lc - pl / ll) - simpo_gamma)

    The implicit reward is beta times the average log-prob per token, which is also what generation ranks by, and
    no reference model is needed. The default beta = 2.0 is the paper's (its range: 2.0-2.5); TRL's CPOConfig
    defaults beta to 0.1 for every loss type, so set it explicitly when comparing. simpo_gamma = 0.5 is TRL's
    default target margin. (TRL computes it as beta * (diff - gamma / beta): the same value.)
    Logged rewards are beta * pc / lc and beta * pl / ll, as TRL's CPO trainer logs them.

    Example (sigmoid's policy log-probs, lc = [1, 2, 1], ll = [1, 1, 2], beta = 2, gamma = 0.5):
    pc / lc = [-1, -1, -2], pl / ll = [-2, -2, -0.5] -> 2 * [1, 1, -1.5] - 0.5 = [1.5, 1.5, -3.5]
    -> loss = [0.201413, 0.201413, 3.529750]; rewards/chosen = 2 * mean[-1, -1, -2] = -8/3, rewards/rejected
    = 2 * mean[-2, -2, -0.5] = -3, rewards/accuracies = 2/3, rewards/margins = 1/3.
    """
    _check_beta(beta, "simpo")
    chosen_mean, rejected_mean = logps.mean_logps("simpo")
    losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - simpo_gamma)
    return losses, _reward_metrics(beta * chosen_mean, beta * rejected_mean, logps)


def nll_chosen(logps: PreferenceLogps) -> tuple[torch.Tensor, Metrics]:
    """Per-token NLL of the chosen response: `-pc / lc` per pair (RPO, Pang et al. 2024, https://arxiv.org/abs/2404.19733).

    Added with a weight to a preference loss it keeps the chosen responses likely (TRL: loss_type ["sigmoid", "sft"]).
    Each pair's NLL is averaged over its own tokens, then pairs are averaged (as in RPO). TRL's "sft" instead
    averages over all chosen tokens of the batch, weighting long responses more; the two agree when the
    chosen lengths are equal. Metric: `nll_loss` (the mean, TRL's ORPO name).

    Example: pc = [-1, -2, -2], lc = [1, 2, 1] -> [1, 1, 2], nll_loss 4/3.
    """
    chosen_lengths, _ = logps.lengths("nll_chosen")
    losses = -logps.policy_chosen / chosen_lengths
    return losses, {"nll_loss": _upcast(losses.detach()).mean()}


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, switching formula at -ln 2 to avoid cancellation (Maechler 2012).

    Each branch gets an input inside its own range, so the branch torch.where does not pick never produces an
    inf whose zero-weighted gradient would still be NaN; x is kept below -eps, so an average log-prob that rounds
    to 0 (one logit leading by ~20 in fp32) gives a large but finite odds ratio instead of inf.
    """
    cut = -math.log(2)
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    small = x < cut
    far = torch.log1p(-torch.exp(torch.where(small, x, torch.full_like(x, cut))))
    near = torch.log(-torch.expm1(torch.where(small, torch.full_like(x, cut), x)))
    return torch.where(small, far, near)


def odds_ratio(logps: PreferenceLogps, *, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """ORPO's odds-ratio term alone (Hong et al. 2024, https://arxiv.org/abs/2403.07691, eq. 7), weighted by beta.

        a = pc / lc, b = pl / ll                     (average log-prob per token)
        log_odds = (a - log(1 - e^a)) - (b - log(1 - e^b))
        loss = -beta * logsigmoid(log_odds)

    beta is the paper's lambda (TRL's ORPOConfig calls it beta, default 0.1). Metrics: TRL's ORPO names, with
    rewards = beta * a, beta * b; `log_odds_ratio` = mean logsigmoid(log_odds), `log_odds_chosen` = mean log_odds.

    Example (two pairs, beta = 1): pc = [ln 1/2, 2 ln 1/2], lc = [1, 2], pl = [ln 1/4, ln 1/2], ll = [1, 1]
    -> a = [ln 1/2, ln 1/2] (odds 1), b = [ln 1/4, ln 1/2] (odds 1/3, 1) -> log_odds = [ln 3, 0]
    -> loss = [ln(4/3), ln 2] = [0.287682, 0.693147]; log_odds_chosen = ln(3)/2 = 0.549306.
    """
    _check_beta(beta, "odds_ratio")
    chosen_mean, rejected_mean = logps.mean_logps("odds_ratio")
    chosen_mean, rejected_mean = _upcast(chosen_mean), _upcast(rejected_mean)
    log_odds = (chosen_mean - _log1mexp(chosen_mean)) - (rejected_mean - _log1mexp(rejected_mean))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    metrics = _reward_metrics(beta * chosen_mean, beta * rejected_mean, logps)
    metrics["log_odds_ratio"] = log_sigmoid_odds.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return -beta * log_sigmoid_odds, metrics


def orpo(logps: PreferenceLogps, *, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """ORPO = nll_chosen + odds_ratio (Hong et al. 2024, https://arxiv.org/abs/2403.07691): SFT and preference in one.

        loss = -pc / lc - beta * logsigmoid(log_odds)        (per pair; see odds_ratio for log_odds)

    Reference-free and meant to be run from the base model, without a separate SFT stage. Returns per pair the
    chosen response's per-token NLL plus the weighted odds-ratio term. TRL's ORPOTrainer differs in one detail:
    its NLL is the token mean over the batch's chosen *prompt and response* tokens; here it is over the response
    only, per pair (the prompt is identical in both responses and is not what the preference is about). Metrics:
    odds_ratio's plus `nll_loss`.

    Example (odds_ratio's two pairs, beta = 1): NLL = -a = [ln 2, ln 2], so loss = [ln 2 + ln(4/3), 2 ln 2]
    = [0.980829, 1.386294].
    """
    nll, nll_metrics = nll_chosen(logps)
    ratio_losses, metrics = odds_ratio(logps, beta=beta)
    return nll + ratio_losses, {**metrics, **nll_metrics}


PREFERENCE_LOSSES: dict[str, PreferenceLossFn] = {
    "sigmoid": sigmoid,
    "robust": robust,
    "hinge": hinge,
    "ipo": ipo,
    "simpo": simpo,
    "orpo": orpo,
    "odds_ratio": odds_ratio,
    "nll_chosen": nll_chosen,
    "sft": nll_chosen,  # TRL's name for the same term
}
_REFERENCE_FREE = frozenset({"simpo", "orpo", "odds_ratio", "nll_chosen", "sft"})


def _check_name(name: str) -> None:
    if name not in PREFERENCE_LOSSES:
        raise ConfigError(
            f"Unknown preference loss '{name}'; choose one of: {', '.join(sorted(PREFERENCE_LOSSES))}."
        )


def requires_reference(name: str | Sequence[str]) -> bool:
    """Whether the loss (or any of a list of losses) needs reference-model log-probs, i.e. a reference model."""
    names = [name] if isinstance(name, str) else list(name)
    for each in names:
        _check_name(each)
    return any(each not in _REFERENCE_FREE for each in names)


def _loss_name(fn: PreferenceLossFn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", "loss")


def combine(terms: Sequence[tuple[PreferenceLossFn | str, float]]) -> PreferenceLossFn:
    """`sum_k weight_k * loss_k` per pair, as one loss function with the same shape as its parts.

    Each term is a loss function (use `functools.partial` for hyperparameters) or a registry name (its defaults),
    with a weight. Metrics: the union of the parts' metrics (on a clash the earlier term's value is kept, so put
    the main loss first) plus `loss/<name>` = each part's unweighted mean. Example: TRL's
    `loss_type=["sigmoid", "sft"]` is `combine([("sigmoid", 1.0), ("nll_chosen", 1.0)])`.
    """
    parts: list[tuple[str, PreferenceLossFn, float]] = []
    for fn, weight in terms:
        if isinstance(fn, str):
            _check_name(fn)
            fn = PREFERENCE_LOSSES[fn]
        name = _loss_name(fn)
        if any(name == existing for existing, _, _ in parts):
            name = f"{name}_{len(parts)}"
        parts.append((name, fn, float(weight)))
    if not parts:
        raise ConfigError("combine() needs at least one (loss, weight) term.")

    def combined(logps: PreferenceLogps) -> tuple[torch.Tensor, Metrics]:
        total: torch.Tensor | None = None
        metrics: Metrics = {}
        for name, fn, weight in parts:
            losses, part_metrics = fn(logps)
            total = weight * losses if total is None else total + weight * losses
            for key, value in part_metrics.items():
                metrics.setdefault(key, value)
            metrics[f"loss/{name}"] = _upcast(losses.detach()).mean()
        assert total is not None
        return total, metrics

    return combined


def build_preference_loss(
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None = None,
    **hyperparameters: float,
) -> PreferenceLossFn:
    """A loss function from config values, TRL style: `build_preference_loss(["sigmoid", "sft"], [1.0, 0.5], beta=0.1)`.

    Each hyperparameter goes to every named loss whose signature takes it (beta goes to all but nll_chosen); one
    that no named loss takes is a ConfigError, as are unknown names and a weights list of the wrong length.
    Missing weights default to 1.0.
    """
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not names:
        raise ConfigError("loss_type is empty; name at least one preference loss, e.g. 'sigmoid'.")
    for name in names:
        _check_name(name)
    weights = [1.0] * len(names) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(names):
        raise ConfigError(
            f"loss_weights has {len(weights)} values but loss_type names {len(names)} losses ({names}); "
            "give one weight per loss."
        )
    accepted: set[str] = set()
    terms: list[tuple[PreferenceLossFn | str, float]] = []
    for name, weight in zip(names, weights):
        fn = PREFERENCE_LOSSES[name]
        takes = set(inspect.signature(fn).parameters) - {"logps"}
        kwargs = {key: value for key, value in hyperparameters.items() if key in takes}
        accepted |= kwargs.keys()
        terms.append((functools.partial(fn, **kwargs), weight))
    unused = sorted(set(hyperparameters) - accepted)
    if unused:
        raise ConfigError(
            f"Preference hyperparameter(s) {unused} are not used by loss_type {names}; remove them or pick a "
            "loss that takes them."
        )
    if len(terms) == 1 and weights[0] == 1.0:
        return terms[0][0]  # type: ignore[return-value]
    return combine(terms)


def logits_metrics(chosen_logits: torch.Tensor, rejected_logits: torch.Tensor) -> Metrics:
    """TRL's `logits/chosen` and `logits/rejected`: the mean logit over response positions and vocabulary.

    Pass the `[N, V]` logits at the chosen and at the rejected response positions. Summed in fp32 without an
    fp32 copy of the logits. Example: chosen [[1, 3]] -> 2.
    """
    def mean(logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return logits.sum(dtype=torch.float32) / max(1, logits.numel())

    return {"logits/chosen": mean(chosen_logits), "logits/rejected": mean(rejected_logits)}
