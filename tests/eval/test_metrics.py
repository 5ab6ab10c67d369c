"""acc, acc_norm, standard errors and perplexity on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from alignkit.eval.metrics import argmax, choice_predictions, mean_stderr, perplexity


def test_argmax_takes_the_first_of_equal_values() -> None:
    assert argmax([-2.0, -1.0, -1.0]) == 1
    assert argmax([-3.0]) == 0


def test_acc_norm_divides_by_the_choice_length_in_characters() -> None:
    # acc: -4 > -6, choice 0. acc_norm: -4 / 2 = -2.0 vs -6 / 5 = -1.2, choice 1.
    assert choice_predictions([-4.0, -6.0], ["no", "maybe"]) == (0, 1)
    # Characters, not bytes: "café" has 4 characters (5 bytes). By characters -4.1 / 4 = -1.025 loses to
    # -5.1 / 5 = -1.02 (choice 1); by bytes -4.1 / 5 = -0.82 would win (choice 0).
    assert choice_predictions([-4.1, -5.1], ["café", "tea!!"]) == (0, 1)


def test_stderr_of_a_mean_of_zeros_and_ones() -> None:
    # p = 3/4, n = 4: sample variance = (3 * (1/4)^2 + (3/4)^2) / 3 = 0.25, stderr = sqrt(0.25 / 4) = 0.25,
    # which is sqrt(p (1 - p) / (n - 1)) = sqrt(0.1875 / 3) = 0.25.
    mean, err = mean_stderr([1.0, 1.0, 0.0, 1.0])
    assert (mean, err) == (0.75, pytest.approx(0.25))
    assert math.isnan(mean_stderr([1.0])[1])


def test_perplexity_is_exp_of_minus_the_mean_loglikelihood() -> None:
    # Mean log-likelihood -2: perplexity e^2. Sample variance of [-1, -3] = (1 + 1) / 1 = 2, stderr of the mean
    # sqrt(2 / 2) = 1, so the delta-method error is e^2 * 1.
    value, err = perplexity([-1.0, -3.0])
    assert value == pytest.approx(math.exp(2))
    assert err == pytest.approx(math.exp(2))
