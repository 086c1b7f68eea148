"""Known-answer tests for the power-law fit shared by compute-equivalent and the scaling report."""

import math

import numpy as np
import pytest
from scipy import stats

from saelab.evals.power_law import FitError, fit_power_law, profile_sse


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
    # No residual variance: the exponent's profile interval closes onto the true exponent.
    assert law.alpha_interval == pytest.approx([alpha, alpha], rel=1e-6) and law.alpha_interval_note is None


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


def test_three_points_are_interpolated_without_standard_errors_or_interval():
    x = np.array([1e3, 1e4, 1e5])
    law = fit_power_law(x, 2 * x ** -0.4 + 0.1)
    assert law.rmse_log < 1e-8 and law.alpha_se is None
    assert law.alpha_interval is None
    assert law.alpha_interval_note.startswith("undefined: 3 points for 3 parameters leave no residual variance")


def wiggled(x, alpha=0.25):
    """The scaling report's law with a fixed +-1 % zigzag (deterministic, not fitted by any smooth law)."""
    return (0.9 * (x / 1024) ** -alpha + 0.05) * np.exp(0.01 * np.where(np.arange(x.size) % 2 == 0, 1, -1))


def test_profile_interval_holds_the_true_exponent_and_shrinks_with_more_points():
    few, many = 2.0 ** np.arange(10, 18), 2.0 ** np.arange(10, 17.75, 0.25)
    law_few, law_many = fit_power_law(few, wiggled(few)), fit_power_law(many, wiggled(many))
    for x, law in ((few, law_few), (many, law_many)):
        low, high = law.alpha_interval
        assert low < 0.25 < high and low < law.alpha < high and law.alpha_interval_note is None
        # Its ends are where the profiled SSE reaches SSE_min (1 + F(0.95; 1, n - 3) / (n - 3)).
        dof = x.size - 3
        threshold = law.rmse_log ** 2 * x.size * (1 + stats.f.ppf(0.95, 1, dof) / dof)
        for end in (low, high):
            assert profile_sse(end, x, wiggled(x)) == pytest.approx(threshold, rel=1e-6)
        assert profile_sse((low + law.alpha) / 2, x, wiggled(x)) < threshold
    width = lambda law: law.alpha_interval[1] - law.alpha_interval[0]  # noqa: E731
    assert width(law_many) < 0.6 * width(law_few)


def test_profile_interval_of_a_floor_free_law_is_the_t_interval():
    # Without c the law is linear in log space, where the F-profile interval is exactly alpha +- t SE.
    x = np.array([1.0, 10.0, 100.0, 1000.0, 3000.0])
    law = fit_power_law(x, 3.0 * x ** -0.5 * np.array([1.01, 0.99, 1.02, 0.98, 1.0]), irreducible=False)
    t = stats.t.ppf(0.975, x.size - 2)
    assert law.alpha_interval == pytest.approx([law.alpha - t * law.alpha_se, law.alpha + t * law.alpha_se], rel=1e-9)


def test_unbounded_interval_is_reported_as_such():
    # Four sizes, 1 % zigzag: any steeper exponent fits as well once c absorbs the decline; the
    # standard error alone (about +-0.16) would hide that.
    x = 2.0 ** np.arange(10, 14)
    law = fit_power_law(x, wiggled(x))
    low, high = law.alpha_interval
    assert high is None and 0 < low < law.alpha and law.alpha_se < 0.2
    assert law.alpha_interval_note.startswith("unbounded above (every alpha up to 57.7 fits)")


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


def test_a_search_that_never_crosses_stops_at_its_limit():
    """A sweep's non-monotone nMSEs (256..2048 latents) fit alpha -51.35 and search up to the limit 57.7078...,
    which alpha + (limit - alpha) misses by an ulp: the search never stopped (`saelab report SWEEP` hung)."""
    from saelab.evals.power_law import _crossing

    calls = []

    def never(a: float) -> float:
        calls.append(a)
        assert len(calls) < 1000, "the search does not stop"
        return -1.0

    assert _crossing(never, -51.35214937836807, 0.05135214937836807, 57.70780163555853) is None
    assert calls[-1] == 57.70780163555853
    for step in (0.0, float("nan")):  # an undefined standard error still doubles its way to the limit
        calls.clear()
        assert _crossing(never, 1.0, step, 5.0) is None and calls[-1] == 5.0
    law = fit_power_law([256, 512, 1024, 2048], [0.37199, 0.34841, 0.34338, 0.38514])
    assert law.alpha < 0  # the nMSE rises with n: no decreasing law, and a report that says so


def test_batched_floor_grid_starts_match_the_fit_and_an_overflowing_inversion_is_infinite():
    """floor_grid_starts gives every set of y the start the fit's own grid picks (closed form, up to rounding), and a
    fit from it lands where the fit lands by itself; the bootstrap of compute-equivalent refits this way."""
    from saelab.evals.power_law import PowerLaw, _start_by_floor_grid, floor_grid_starts

    rng = np.random.default_rng(3)
    x = np.logspace(7, 9.6, 6)
    Y = (40 * x ** -0.12 + 2) * (1 + rng.normal(0, 0.01, (20, 6)))
    starts = floor_grid_starts(x, Y)
    assert starts.shape == (20, 3)
    for y, start in zip(Y, starts):
        assert start == pytest.approx(_start_by_floor_grid(np.log(x), np.log(y), y), rel=1e-9, abs=1e-12)
        own, given = fit_power_law(x, y), fit_power_law(x, y, start=start, interval_level=None)
        # as close as the optimizer stops from two starts an ulp apart (the floor c is the flattest direction)
        assert (given.a, given.alpha, given.c) == pytest.approx((own.a, own.alpha, own.c), rel=1e-4)
        assert given.alpha_interval is None
    # (a / (y - c))^(1/b) past the largest float: never reached, as y <= c is, not an OverflowError.
    assert PowerLaw(a=1e10, alpha=0.01, c=0.0, n_points=3, rmse_log=0.0).invert(1.0) == math.inf
