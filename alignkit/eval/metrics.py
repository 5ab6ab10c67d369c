"""Metrics of log-likelihood tasks as lm-evaluation-harness defines them: pure functions of the scores.

- `acc`: the choice with the highest summed log-likelihood is the gold one (the first on a tie, numpy's argmax).
- `acc_norm`: the same after dividing each log-likelihood by the length of its choice string in characters
  (lm-evaluation-harness's `completion_len = len(choice)`, the choice without the leading delimiter; its
  byte-length variant is a separate metric, `acc_bytes`).
- LAMBADA-style `acc`: the continuation is what greedy decoding produces (every token the argmax);
  `perplexity`: exp(-mean of the continuations' summed log-likelihoods).
- Standard errors of means: the sample standard deviation over sqrt(n), lm-evaluation-harness's `mean_stderr`;
  for 0/1 values with mean p that is sqrt(p (1 - p) / (n - 1)).
- A group of tasks (MMLU's subjects): the macro average (every task weighs the same) with the standard error of
  a mean of independent means, and the micro average (every item weighs the same: lm-evaluation-harness's
  `weight_by_size` group score) with its `pooled_sample_stderr`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on a tie (as numpy.argmax)."""
    if not values:
        raise ValueError("argmax of an empty sequence")
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best


def choice_predictions(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(prediction, length-normalised prediction) for one multiple-choice item.

    Example: log-likelihoods [-4.0, -6.0] for choices ["no", "maybe"]: acc picks 0 (-4 > -6); acc_norm compares
    -4 / 2 = -2.0 with -6 / 5 = -1.2 and picks 1.
    """
    normalised = [ll / max(len(choice), 1) for ll, choice in zip(loglikelihoods, choices)]
    return argmax(loglikelihoods), argmax(normalised)


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean): sample standard deviation (n - 1) / sqrt(n); NaN error for n < 2."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def perplexity(loglikelihoods: Sequence[float]) -> tuple[float, float]:
    """(exp(-mean log-likelihood), its standard error by the delta method: perplexity x stderr of the mean).

    lm-evaluation-harness bootstraps this error (100k resamples); the delta method is its first-order value.
    """
    mean, stderr = mean_stderr(loglikelihoods)
    if math.isnan(mean):
        return math.nan, math.nan
    value = math.exp(-mean) if -mean < 700 else math.inf
    return value, value * stderr


def macro_mean_stderr(means: Sequence[float], stderrs: Sequence[float]) -> tuple[float, float]:
    """(mean of the task means, its standard error sqrt(sum of squared stderrs) / number of tasks): the tasks'
    items are independent, so the variances of their means add. NaN error when a task has none (n < 2).

    Example: means [0.5, 1.0] with stderrs [0.3, 0.4]: (0.75, sqrt(0.09 + 0.16) / 2 = 0.25).
    """
    if not means:
        return math.nan, math.nan
    mean = sum(means) / len(means)
    return mean, math.sqrt(sum(e * e for e in stderrs)) / len(stderrs)


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """lm-evaluation-harness's `pooled_sample_stderr` of a size-weighted group mean: the tasks' sample variances
    (stderr^2 x n) pooled with weights n - 1 over (N - number of tasks), then over sqrt(N).

    Example: stderrs [0.3, 0.4] of sizes [2, 3] are variances 0.18 and 0.48; pooled (1 x 0.18 + 2 x 0.48) / 3 =
    0.38; stderr sqrt(0.38 / 5).
    """
    total = sum(sizes)
    # A task of one item adds nothing (n - 1 = 0), though its own error is undefined.
    terms = [(e, n) for e, n in zip(stderrs, sizes) if n > 1]
    if total - len(sizes) < 1 or any(math.isnan(e) for e, _ in terms):
        return math.nan
    pooled = sum((n - 1) * e * e * n for e, n in terms) / (total - len(sizes))
    return math.sqrt(pooled / total)
