"""Known-answer tests for the power-law fit shared by compute-equivalent and the scaling report."""

import math

import numpy as np
import pytest

from saelab.evals.power_law import FitError, fit_power_law


@pytest.mark.parametrize("a,alpha,c", [(2.5, 0.3, 0.08), (0.9 * 1024 ** 0.25, 0.25, 0.05), (40.0, 0.07, 1.7)])
def test_exact_data_recovers_parameters(a, alpha, c):
    x = np.logspace(3, 6, 8)
    law = fit_power_law(x, a * x ** -alpha + c)
    assert law.alpha == pytest.approx(alpha, rel=1e-6)
    assert law.a == pytest.approx(a, rel=1e-5)
    assert law.c == pytest.approx(c, rel=1e-5, abs=1e-9)
    assert law.rmse_log < 1e-9 and law.n_points == 8
    # Inversion is the exact inverse of the law.
    y = a * 3e4 ** -alpha + c
    assert law.invert(y) == pytest.approx(3e4, rel=1e-5)
    assert law.invert(law.c) == math.inf and law.invert(c / 2) == math.inf  # never reached


def test_noisy_data_recovers_exponent_within_its_standard_error():
    rng = np.random.default_rng(0)
    x = 2.0 ** np.arange(10, 18)
    y = 0.9 * (x / 1024) ** -0.25 + 0.05
    law = fit_power_law(x, y * np.exp(rng.normal(0, 0.01, x.size)))
    assert abs(law.alpha - 0.25) < 3 * law.alpha_se and law.alpha_se < 0.05
    assert law.rmse_log == pytest.approx(0.01, rel=0.6)
    assert len(law.residuals_log) == x.size


def test_without_irreducible_term_is_log_linear_least_squares():
    x = np.array([1.0, 10.0, 100.0, 1000.0])
    y = 3.0 * x ** -0.5 * np.array([1.01, 0.99, 1.02, 0.98])
    law = fit_power_law(x, y, irreducible=False)
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    assert law.c == 0 and law.alpha == pytest.approx(-slope, rel=1e-9)
    assert law.a == pytest.approx(math.exp(intercept), rel=1e-9)


def test_three_points_are_interpolated_without_standard_errors():
    x = np.array([1e3, 1e4, 1e5])
    law = fit_power_law(x, 2 * x ** -0.4 + 0.1)
    assert law.rmse_log < 1e-8 and law.alpha_se is None


@pytest.mark.parametrize("x,y,match", [
    ([1, 2], [3, 2], "at least 3 points, got 2"),
    ([1, 2, 3], [3, 0, 1], "finite and > 0"),
    ([1, -2, 3], [3, 2, 1], "finite and > 0"),
    ([5, 5, 5], [3, 2, 1], "2 distinct x"),
    ([1, 2, 3], [3, 2], "same length"),
])
def test_bad_data_is_refused_with_the_name_of_the_data(x, y, match):
    with pytest.raises(FitError, match=f"nMSE of k=32: .*{match}"):
        fit_power_law(x, y, what="nMSE of k=32")
