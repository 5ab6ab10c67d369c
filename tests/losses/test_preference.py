"""The DPO family: hand-computed values from the docstrings, invariants, gradients, and a plain re-implementation."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import (
    PREFERENCE_LOSSES,
    PreferenceLogps,
    build_preference_loss,
    combine,
    hinge,
    ipo,
    logits_metrics,
    nll_chosen,
    odds_ratio,
    orpo,
    requires_reference,
    robust,
    sigmoid,
    simpo,
)

LN2 = math.log(2.0)
METRIC_KEYS = {
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
}


def three_pairs(**overrides: torch.Tensor) -> PreferenceLogps:
    """The docstrings' example: h = [1, 0, -1]."""
    fields = dict(
        policy_chosen=torch.tensor([-1.0, -2.0, -2.0]),
        policy_rejected=torch.tensor([-2.0, -2.0, -1.0]),
        reference_chosen=torch.tensor([-2.0, -2.0, -2.0]),
        reference_rejected=torch.tensor([-2.0, -2.0, -2.0]),
        chosen_lengths=torch.tensor([1, 2, 1]),
        rejected_lengths=torch.tensor([1, 1, 2]),
    )
    fields.update(overrides)
    return PreferenceLogps(**fields)


def assert_values(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def assert_metrics(metrics: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert abs(metrics[key].item() - value) < 1e-6, (key, metrics[key].item(), value)
        assert metrics[key].ndim == 0 and not metrics[key].requires_grad


# ---- hand-computed values (the numbers in each docstring) --------------------------------------------------------


def test_sigmoid_docstring_example() -> None:
    losses, metrics = sigmoid(three_pairs(), beta=1.0)
    assert_values(losses, [0.313262, 0.693147, 1.313262])
    assert set(metrics) == METRIC_KEYS
    assert_metrics(metrics, {
        "rewards/chosen": 1 / 3, "rewards/rejected": 1 / 3, "rewards/accuracies": 1 / 3, "rewards/margins": 0.0,
        "logps/chosen": -5 / 3, "logps/rejected": -5 / 3,
    })
    losses, _ = sigmoid(three_pairs(), beta=1.0, label_smoothing=0.1)
    assert_values(losses, [0.413262, LN2, 1.213262])


def test_dpo_is_ln2_when_policy_equals_reference() -> None:
    logps = torch.randn(5) * 10 - 30
    other = torch.randn(5) * 10 - 30
    same = PreferenceLogps(logps, other, logps.clone(), other.clone())
    for beta in (0.01, 0.1, 1.0):
        losses, metrics = sigmoid(same, beta=beta)
        assert_values(losses, [LN2] * 5)
        assert metrics["rewards/margins"].item() == 0.0 and metrics["rewards/accuracies"].item() == 0.0


def test_robust_docstring_example() -> None:
    losses, metrics = robust(three_pairs(), beta=1.0, label_smoothing=0.1)
    assert_values(losses, [0.188262, LN2, 1.438262])
    assert_metrics(metrics, {"rewards/chosen": 1 / 3, "rewards/margins": 0.0})


def test_hinge_docstring_example() -> None:
    losses, metrics = hinge(three_pairs(), beta=1.0)
    assert_values(losses, [0.0, 1.0, 2.0])
    assert_metrics(metrics, {"rewards/accuracies": 1 / 3})


def test_ipo_docstring_example() -> None:
    losses, metrics = ipo(three_pairs(), beta=0.5)
    assert_values(losses, [0.0, 1.0, 2.25])
    assert_metrics(metrics, {"rewards/chosen": 1 / 6, "rewards/rejected": 1 / 6, "rewards/margins": 0.0})


def test_simpo_docstring_example() -> None:
    losses, metrics = simpo(three_pairs(reference_chosen=None, reference_rejected=None), beta=2.0, simpo_gamma=0.5)
    assert_values(losses, [0.201413, 0.201413, 3.529750])
    assert_metrics(metrics, {
        "rewards/chosen": -8 / 3, "rewards/rejected": -3.0, "rewards/accuracies": 2 / 3, "rewards/margins": 1 / 3,
        "logps/chosen": -5 / 3, "logps/rejected": -5 / 3,
    })


def test_nll_chosen_docstring_example() -> None:
    losses, metrics = nll_chosen(three_pairs())
    assert_values(losses, [1.0, 1.0, 2.0])
    assert_metrics(metrics, {"nll_loss": 4 / 3})


def orpo_pairs() -> PreferenceLogps:
    half, quarter = math.log(0.5), math.log(0.25)
    return PreferenceLogps(
        policy_chosen=torch.tensor([half, 2 * half]), policy_rejected=torch.tensor([quarter, half]),
        chosen_lengths=torch.tensor([1, 2]), rejected_lengths=torch.tensor([1, 1]),
    )


def test_odds_ratio_and_orpo_docstring_example() -> None:
    losses, metrics = odds_ratio(orpo_pairs(), beta=1.0)
    assert_values(losses, [math.log(4 / 3), LN2])
    assert_values(losses, [0.287682, 0.693147])
    assert_metrics(metrics, {
        "log_odds_chosen": math.log(3) / 2, "log_odds_ratio": -(math.log(4 / 3) + LN2) / 2,
        "rewards/chosen": -LN2, "rewards/rejected": (math.log(0.25) - LN2) / 2,
    })
    losses, metrics = orpo(orpo_pairs(), beta=1.0)
    assert_values(losses, [0.980829, 1.386294])
    assert_metrics(metrics, {"nll_loss": LN2, "log_odds_chosen": math.log(3) / 2})
    # ORPO is literally the sum of its two parts, for any beta.
    ratio, _ = odds_ratio(orpo_pairs(), beta=0.1)
    nll, _ = nll_chosen(orpo_pairs())
    torch.testing.assert_close(orpo(orpo_pairs(), beta=0.1)[0], ratio + nll, atol=0, rtol=0)


def test_log1mexp_is_stable_near_zero_and_far_below() -> None:
    pairs = PreferenceLogps(
        policy_chosen=torch.tensor([-1e-6, -80.0], dtype=torch.float64),
        policy_rejected=torch.tensor([-5.0, -1e-6], dtype=torch.float64),
        chosen_lengths=torch.tensor([1, 1]), rejected_lengths=torch.tensor([1, 1]),
    )
    _, metrics = odds_ratio(pairs, beta=1.0)
    expected = [
        (a - math.log(-math.expm1(a))) - (b - math.log(-math.expm1(b))) for a, b in [(-1e-6, -5.0), (-80.0, -1e-6)]
    ]
    assert math.isfinite(metrics["log_odds_chosen"].item())
    assert abs(metrics["log_odds_chosen"].item() - sum(expected) / 2) < 1e-9


# ---- invariants ---------------------------------------------------------------------------------------------------


def random_pairs(batch: int = 16, dtype: torch.dtype = torch.float64, seed: int = 0) -> PreferenceLogps:
    g = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.randint(1, 40, (batch,), generator=g)
    rejected_lengths = torch.randint(1, 40, (batch,), generator=g)

    def logps(lengths: torch.Tensor) -> torch.Tensor:
        return -(torch.rand(batch, generator=g, dtype=dtype) * 2 + 0.05) * lengths.to(dtype)

    return PreferenceLogps(
        policy_chosen=logps(chosen_lengths), policy_rejected=logps(rejected_lengths),
        reference_chosen=logps(chosen_lengths), reference_rejected=logps(rejected_lengths),
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
    )


def test_cdpo_and_robust_with_zero_smoothing_equal_dpo() -> None:
    pairs = random_pairs()
    dpo, dpo_metrics = sigmoid(pairs, beta=0.1)
    for fn in (sigmoid, robust):
        losses, metrics = fn(pairs, beta=0.1, label_smoothing=0.0)
        torch.testing.assert_close(losses, dpo, atol=1e-12, rtol=0)
        assert metrics.keys() == dpo_metrics.keys()


def test_combine_is_the_weighted_sum_and_merges_metrics() -> None:
    pairs = random_pairs()
    combined = combine([(functools.partial(sigmoid, beta=0.2), 0.8), ("nll_chosen", 0.5), ("hinge", 1.5)])
    losses, metrics = combined(pairs)
    expected = (
        0.8 * sigmoid(pairs, beta=0.2)[0] + 0.5 * nll_chosen(pairs)[0] + 1.5 * hinge(pairs, beta=0.1)[0]
    )
    torch.testing.assert_close(losses, expected, atol=1e-12, rtol=0)
    # Metrics: the first term's rewards (beta 0.2), nll_loss, and each part's unweighted mean.
    assert_metrics(metrics, {
        "rewards/chosen": sigmoid(pairs, beta=0.2)[1]["rewards/chosen"].item(),
        "nll_loss": nll_chosen(pairs)[0].mean().item(),
        "loss/sigmoid": sigmoid(pairs, beta=0.2)[0].mean().item(),
        "loss/nll_chosen": nll_chosen(pairs)[0].mean().item(),
        "loss/hinge": hinge(pairs)[0].mean().item(),
    })


def test_build_preference_loss_routes_hyperparameters_like_trl() -> None:
    pairs = random_pairs()
    loss_fn = build_preference_loss(["sigmoid", "sft"], [1.0, 0.5], beta=0.3)
    expected = sigmoid(pairs, beta=0.3)[0] + 0.5 * nll_chosen(pairs)[0]
    torch.testing.assert_close(loss_fn(pairs)[0], expected, atol=1e-12, rtol=0)
    single = build_preference_loss("simpo", simpo_gamma=1.0)  # simpo keeps its own default beta 2.0
    torch.testing.assert_close(single(pairs)[0], simpo(pairs, beta=2.0, simpo_gamma=1.0)[0], atol=0, rtol=0)
    with pytest.raises(ConfigError, match="simpo_gamma"):
        build_preference_loss("sigmoid", simpo_gamma=1.0)
    with pytest.raises(ConfigError, match="Unknown preference loss 'dpo'"):
        build_preference_loss("dpo")
    with pytest.raises(ConfigError, match="one weight per loss"):
        build_preference_loss(["sigmoid", "sft"], [1.0])


def test_requires_reference() -> None:
    assert requires_reference("sigmoid") and requires_reference("ipo") and requires_reference("robust")
    assert requires_reference("hinge")
    for name in ("simpo", "orpo", "nll_chosen", "sft", "odds_ratio"):
        assert not requires_reference(name)
    assert requires_reference(["sft", "sigmoid"]) and not requires_reference(["simpo", "sft"])
    with pytest.raises(ConfigError, match="choose one of"):
        requires_reference("kto")
    # The flag is honest: reference-free losses run without reference log-probs, the others ask for them.
    no_reference = three_pairs(reference_chosen=None, reference_rejected=None)
    for name, fn in PREFERENCE_LOSSES.items():
        if requires_reference(name):
            with pytest.raises(ValueError, match="reference"):
                fn(no_reference)
        else:
            assert fn(no_reference)[0].shape == (3,)


def test_missing_lengths_and_bad_hyperparameters_are_explained() -> None:
    no_lengths = three_pairs(chosen_lengths=None, rejected_lengths=None)
    with pytest.raises(ValueError, match="sequence_lengths"):
        ipo(no_lengths)
    with pytest.raises(ConfigError, match=r"\[0, 0.5\)"):
        robust(three_pairs(), label_smoothing=0.5)
    with pytest.raises(ConfigError, match="positive"):
        ipo(three_pairs(), beta=0.0)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_one_sgd_step_raises_the_chosen_margin(name: str) -> None:
    """Gradient descent on the policy log-probs moves chosen up relative to rejected, for every loss."""
    pairs = random_pairs(batch=8, dtype=torch.float32)
    chosen = pairs.policy_chosen.clone().requires_grad_()
    rejected = pairs.policy_rejected.clone().requires_grad_()
    step = PreferenceLogps(chosen, rejected, pairs.reference_chosen, pairs.reference_rejected,
                           pairs.chosen_lengths, pairs.rejected_lengths)
    losses, _ = PREFERENCE_LOSSES[name](step)
    losses.mean().backward()
    assert chosen.grad is not None
    with torch.no_grad():
        new_chosen = chosen - 1.0 * chosen.grad
        new_rejected = rejected if rejected.grad is None else rejected - 1.0 * rejected.grad
    old_margin = pairs.policy_chosen - pairs.policy_rejected
    new_margin = new_chosen - new_rejected
    # Strictly wherever the pair has a loss; hinge pairs already past the 1/beta margin have no gradient.
    active = losses.detach() > 0
    assert active.sum() >= 6
    assert torch.all(new_margin[active] > old_margin[active]), name
    assert torch.all(new_margin >= old_margin), name
    new_losses, _ = PREFERENCE_LOSSES[name](
        PreferenceLogps(new_chosen, new_rejected, pairs.reference_chosen, pairs.reference_rejected,
                        pairs.chosen_lengths, pairs.rejected_lengths)
    )
    assert new_losses.mean() < losses.mean()


def test_logits_metrics() -> None:
    chosen = torch.tensor([[1.0, 3.0]], dtype=torch.bfloat16)
    rejected = torch.randn(5, 7)
    metrics = logits_metrics(chosen, rejected)
    assert metrics["logits/chosen"].item() == 2.0 and metrics["logits/chosen"].dtype == torch.float32
    assert abs(metrics["logits/rejected"].item() - rejected.mean().item()) < 1e-6


# ---- an independent plain re-implementation (python floats and math, one pair at a time) --------------------------


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def plain_losses(name: str, pair: dict[str, float], beta: float, eps: float, gamma: float) -> float:
    pc, pl, rc, rl = pair["pc"], pair["pl"], pair["rc"], pair["rl"]
    lc, ll = max(pair["lc"], 1.0), max(pair["ll"], 1.0)
    h = (pc - rc) - (pl - rl)
    if name == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if name == "robust":
        return ((1 - eps) * -log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if name == "hinge":
        return max(0.0, 1 - beta * h)
    if name == "ipo":
        return ((pc - rc) / lc - (pl - rl) / ll - 1 / (2 * beta)) ** 2
    if name == "simpo":
        return -log_sigmoid(beta * (pc / lc - pl / ll) - gamma)
    if name in ("nll_chosen", "sft"):
        return -pc / lc
    a, b = pc / lc, pl / ll
    log_odds = (a - math.log(1 - math.exp(a))) - (b - math.log(1 - math.exp(b)))
    ratio = -beta * log_sigmoid(log_odds)
    return ratio if name == "odds_ratio" else ratio - pc / lc


def plain_metrics(name: str, pairs: list[dict[str, float]], beta: float) -> dict[str, float]:
    if name in ("nll_chosen", "sft"):
        return {"nll_loss": sum(-p["pc"] / p["lc"] for p in pairs) / len(pairs)}
    if name in ("simpo", "orpo", "odds_ratio"):  # reference-free: beta * average log-prob per token
        chosen = [beta * p["pc"] / p["lc"] for p in pairs]
        rejected = [beta * p["pl"] / p["ll"] for p in pairs]
    else:
        chosen = [beta * (p["pc"] - p["rc"]) for p in pairs]
        rejected = [beta * (p["pl"] - p["rl"]) for p in pairs]
    n = len(pairs)
    metrics = {
        "rewards/chosen": sum(chosen) / n,
        "rewards/rejected": sum(rejected) / n,
        "rewards/accuracies": sum(c > r for c, r in zip(chosen, rejected)) / n,
        "rewards/margins": sum(c - r for c, r in zip(chosen, rejected)) / n,
        "logps/chosen": sum(p["pc"] for p in pairs) / n,
        "logps/rejected": sum(p["pl"] for p in pairs) / n,
    }
    if name in ("orpo", "odds_ratio"):
        log_odds = []
        for p in pairs:
            a, b = p["pc"] / p["lc"], p["pl"] / p["ll"]
            log_odds.append((a - math.log(1 - math.exp(a))) - (b - math.log(1 - math.exp(b))))
        metrics["log_odds_chosen"] = sum(log_odds) / n
        metrics["log_odds_ratio"] = sum(log_sigmoid(x) for x in log_odds) / n
    if name == "orpo":
        metrics["nll_loss"] = sum(-p["pc"] / p["lc"] for p in pairs) / n
    return metrics


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_plain_reimplementation(name: str, seed: int) -> None:
    pairs = random_pairs(batch=12, seed=seed)
    plain_pairs = [
        {key: float(getattr(pairs, field)[i]) for key, field in [
            ("pc", "policy_chosen"), ("pl", "policy_rejected"), ("rc", "reference_chosen"),
            ("rl", "reference_rejected"), ("lc", "chosen_lengths"), ("ll", "rejected_lengths"),
        ]}
        for i in range(12)
    ]
    beta, eps, gamma = (2.5, 0.0, 1.3) if name == "simpo" else (0.1 + 0.2 * seed, 0.15, 0.0)
    kwargs: dict[str, float] = {}
    if name != "nll_chosen" and name != "sft":
        kwargs["beta"] = beta
    if name in ("sigmoid", "robust"):
        kwargs["label_smoothing"] = eps
    if name == "simpo":
        kwargs["simpo_gamma"] = gamma
    losses, metrics = PREFERENCE_LOSSES[name](pairs, **kwargs)
    expected = [plain_losses(name, p, beta, eps, gamma) for p in plain_pairs]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    expected_metrics = plain_metrics(name, plain_pairs, beta)
    assert set(metrics) == set(expected_metrics)
    for key, value in expected_metrics.items():
        assert abs(metrics[key].item() - value) < 1e-6, (name, key)


# ---- gradients: hand-derived, in python floats, against autograd in float64 ------------------------------------


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def plain_gradients(name: str, p: dict[str, float], beta: float, eps: float, gamma: float) -> tuple[float, float]:
    """(dL/d policy_chosen, dL/d policy_rejected) of one pair, derived by hand."""
    pc, pl, rc, rl = p["pc"], p["pl"], p["rc"], p["rl"]
    lc, ll = max(p["lc"], 1.0), max(p["ll"], 1.0)
    h = (pc - rc) - (pl - rl)
    if name in ("sigmoid", "robust", "hinge"):
        if name == "sigmoid":  # -(1-e) log s(bh) - e log s(-bh)
            d = -beta * ((1 - eps) * sig(-beta * h) - eps * sig(beta * h))
        elif name == "robust":  # ((1-e)(-log s(bh)) + e log s(-bh)) / (1 - 2e)
            d = -beta * ((1 - eps) * sig(-beta * h) + eps * sig(beta * h)) / (1 - 2 * eps)
        else:  # max(0, 1 - bh)
            d = -beta if 1 - beta * h > 0 else 0.0
        return d, -d
    if name == "ipo":  # (x - 1/(2b))^2, x = (pc - rc)/lc - (pl - rl)/ll
        x = (pc - rc) / lc - (pl - rl) / ll
        return 2 * (x - 1 / (2 * beta)) / lc, -2 * (x - 1 / (2 * beta)) / ll
    if name == "simpo":  # -log s(z), z = b (pc/lc - pl/ll) - gamma
        z = beta * (pc / lc - pl / ll) - gamma
        return -sig(-z) * beta / lc, sig(-z) * beta / ll
    if name in ("nll_chosen", "sft"):
        return -1 / lc, 0.0
    a, b = pc / lc, pl / ll  # odds ratio: -b log s(u), u = (a - log(1 - e^a)) - (b - log(1 - e^b)); du/da = 1/(1 - e^a)
    u = (a - math.log(-math.expm1(a))) - (b - math.log(-math.expm1(b)))
    du = -beta * sig(-u)
    dc, dr = du / -math.expm1(a) / lc, -du / -math.expm1(b) / ll
    return (dc, dr) if name == "odds_ratio" else (dc - 1 / lc, dr)


def edge_pairs() -> PreferenceLogps:
    """Equal log-probs, margins of +-50 (beta = 1), long and one-token responses, log-probs near 0."""
    chosen = [-3.0, -60.0, -10.0, -5.0, -1e-3, -0.7, -2.0]
    rejected = [-3.0, -10.0, -60.0, -5.0, -4.0, -1e-3, -2.0]
    ref_chosen = [-3.0, -10.0, -10.0, -9.0, -2.0, -0.5, -2.0]
    ref_rejected = [-3.0, -10.0, -10.0, -1.0, -2.0, -0.5, -2.0]
    f64 = functools.partial(torch.tensor, dtype=torch.float64)
    return PreferenceLogps(
        policy_chosen=f64(chosen), policy_rejected=f64(rejected), reference_chosen=f64(ref_chosen),
        reference_rejected=f64(ref_rejected), chosen_lengths=torch.tensor([1, 3, 7, 2, 1, 1, 40]),
        rejected_lengths=torch.tensor([1, 5, 2, 2, 3, 1, 40]),
    )


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
@pytest.mark.parametrize("case", ["random", "edges"])
def test_gradients_match_hand_derivation(name: str, case: str) -> None:
    pairs = random_pairs(batch=12, seed=3) if case == "random" else edge_pairs()
    beta, eps, gamma = (1.0, 0.2, 0.7) if case == "edges" else (0.3, 0.15, 0.4)
    if name == "simpo":
        beta = 2.5
    kwargs: dict[str, float] = {}
    if name not in ("nll_chosen", "sft"):
        kwargs["beta"] = beta
    if name in ("sigmoid", "robust"):
        kwargs["label_smoothing"] = eps
    if name == "simpo":
        kwargs["simpo_gamma"] = gamma
    chosen = pairs.policy_chosen.clone().requires_grad_(True)
    rejected = pairs.policy_rejected.clone().requires_grad_(True)
    leaf = PreferenceLogps(chosen, rejected, pairs.reference_chosen, pairs.reference_rejected,
                           pairs.chosen_lengths, pairs.rejected_lengths)
    losses, _ = PREFERENCE_LOSSES[name](leaf, **kwargs)
    assert losses.dtype == torch.float64
    losses.sum().backward()
    grad_rejected = rejected.grad if rejected.grad is not None else torch.zeros_like(rejected)  # nll: no dependence
    for i in range(len(chosen)):
        p = {"pc": float(pairs.policy_chosen[i]), "pl": float(pairs.policy_rejected[i]),
             "rc": float(pairs.reference_chosen[i]),
             "rl": float(pairs.reference_rejected[i]), "lc": float(pairs.chosen_lengths[i]),
             "ll": float(pairs.rejected_lengths[i])}
        expected = plain_gradients(name, p, beta, eps, gamma)
        assert float(chosen.grad[i]) == pytest.approx(expected[0], rel=1e-12, abs=1e-12), (name, i, "chosen")
        assert float(grad_rejected[i]) == pytest.approx(expected[1], rel=1e-12, abs=1e-12), (name, i, "rejected")
        assert float(losses[i].detach()) == pytest.approx(plain_losses(name, p, beta, eps, gamma), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_gradient_is_finite_when_an_average_log_prob_rounds_to_zero(dtype: torch.dtype) -> None:
    """One logit leading by ~20 makes a one-token answer's log-prob round to 0 in fp32; ORPO's gradient was NaN
    there (the unused branch of log1mexp was -inf)."""
    chosen = torch.tensor([0.0, -2e-9, -1.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-1.0, -2.0, 0.0], dtype=dtype, requires_grad=True)
    logps = PreferenceLogps(chosen, rejected, chosen_lengths=torch.tensor([1, 2, 1]),
                            rejected_lengths=torch.tensor([1, 1, 1]))
    for fn in (orpo, odds_ratio):
        chosen.grad = rejected.grad = None
        losses, _ = fn(logps, beta=0.1)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
