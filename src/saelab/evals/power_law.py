"""Power laws with an irreducible term, ``y = a * x^(-alpha) + c``, fitted with ``scipy.optimize``.

Used twice: the LM loss against training tokens (compute-equivalent, paper §4.1) and the SAE's
nMSE against its number of latents (the scaling study, paper §3).

**Objective.** Residuals are taken in log space, ``r_i = log y_i - log(a x_i^-alpha + c)``, so
every point counts by its *relative* error (losses of 3 nats and nMSEs of 0.1 are fitted alike,
and the many points near the floor do not swamp the few far above it). Parameters: ``a > 0``,
``alpha`` (any sign; a decreasing law has ``alpha > 0``), ``c >= 0`` (``c = 0`` with
``irreducible=False``, where the fit is plain log-log least squares).

**Method.** (1) Profile over ``c``: for each ``c`` on a grid in ``[0, min y)``, denser near
``min y``, ``log(y - c) = log a - alpha log x`` is a linear least-squares problem; the grid point
whose curve has the smallest log-space objective is the start (a local optimizer started
elsewhere can stop on the flat ridge where ``c`` trades against ``a``). (2)
``scipy.optimize.least_squares`` (trust-region reflective, ``c >= 0`` as a bound, analytic
Jacobian) on ``(log a, alpha, c)``. Standard errors come from ``s^2 (J^T J)^-1`` with
``s^2 = SSE / (n - p)`` (None when n = p).

**Exponent interval.** The standard error assumes the objective is quadratic in the parameters;
with few points and a floor it is far from it (``c`` can absorb the decline), so alpha also gets a
profile-likelihood interval: for each alpha, ``a`` and ``c`` are refitted (same objective), and
the interval is where the profiled SSE stays within ``SSE_min * (1 + F(level; 1, n - p) / (n - p))``
(the F threshold for one parameter with the residual variance estimated from the fit; for a law
without floor, which is linear in log space, this is exactly alpha ± t * SE). It is undefined
when n = p (no residual variance) and may be unbounded on a side (reported as None there, with
the reason).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from saelab.errors import SaelabError

# scipy (~0.8 s to import) is imported in the functions that fit: every saelab command imports this module
# through the eval verb's options, and --help or a refused option should not wait for it.

_TOL = 1e-15  # least_squares tolerances: exact data must come back to ~1e-9 relative
_FLAT = 40.0  # alpha * log(x ratio) beyond which x^-alpha is exp(-40) ~ 0: the profile no longer changes


class FitError(SaelabError, ValueError):
    """Data a power law cannot be fitted to (too few points, non-positive values)."""


@dataclass
class PowerLaw:
    """A fitted ``y = a * x^(-alpha) + c``."""

    a: float
    alpha: float
    c: float
    """Irreducible term (0 when fitted without one)."""
    n_points: int
    rmse_log: float
    """Root-mean-square of the log-space residuals (0.01 = about 1 % relative error)."""
    residuals_log: list[float] = field(default_factory=list)
    """``log y - log fit`` per point, in input order."""
    alpha_se: float | None = None
    """Standard error of alpha (None when the fit has no degrees of freedom left)."""
    c_se: float | None = None
    """Standard error of c (None without an irreducible term or degrees of freedom)."""
    irreducible: bool = True
    alpha_interval: list[float | None] | None = None
    """``[low, high]`` profile-likelihood interval of alpha at ``interval_level``; None when undefined
    (see ``alpha_interval_note``); a None end is unbounded on that side."""
    alpha_interval_note: str | None = None
    """Why the interval is undefined or unbounded (None when it is a plain bounded interval)."""
    interval_level: float | None = None

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.a * np.power(x, -self.alpha) + self.c

    def invert(self, y: float) -> float:
        """The x at which the law reaches ``y``; inf when ``y <= c`` for a decreasing law (never reached)."""
        if y - self.c <= 0:
            return math.inf if self.alpha > 0 else 0.0
        if self.alpha == 0:
            return math.nan
        try:
            return float((self.a / (y - self.c)) ** (1.0 / self.alpha))
        except OverflowError:  # past the largest float (a flat law far above its floor): as good as never
            return math.inf

    def to_dict(self) -> dict:
        return asdict(self)


def _check(x: Sequence[float], y: Sequence[float], what: str, min_points: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise FitError(f"{what}: x and y must be 1-D of the same length, got {x.shape} and {y.shape}")
    if x.size < min_points:
        raise FitError(f"{what}: a power law needs at least {min_points} points, got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or (x <= 0).any() or (y <= 0).any():
        raise FitError(f"{what}: every x and y must be finite and > 0, got x={x.tolist()} y={y.tolist()}")
    if np.unique(x).size < 2:
        raise FitError(f"{what}: needs at least 2 distinct x values, got {x.tolist()}")
    return x, y


def _loglinear(lx: np.ndarray, ly: np.ndarray) -> tuple[float, float]:
    """Least squares ``ly = la - alpha * lx`` -> (la, alpha)."""
    A = np.stack([np.ones_like(lx), -lx], axis=1)
    (la, alpha), *_ = np.linalg.lstsq(A, ly, rcond=None)
    return float(la), float(alpha)


def _model_log(theta: np.ndarray, lx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``log(a x^-alpha + c)`` and its Jacobian in ``(log a, alpha, c)``."""
    la, alpha, c = theta
    p = np.exp(np.clip(la - alpha * lx, -700, 700))
    m = p + c
    return np.log(m), np.stack([p / m, -lx * p / m, 1.0 / m], axis=1)


def _sse(theta: np.ndarray, lx: np.ndarray, ly: np.ndarray) -> float:
    la, alpha, c = theta
    m = np.exp(np.clip(la - alpha * lx, -700, 700)) + c
    return float(np.sum((ly - np.log(m)) ** 2)) if np.all(m > 0) else math.inf


# c / min y on [0, 1): uniform, plus points crowding 1 (where the floor is nearly reached).
_FLOOR_GRID = np.unique(np.concatenate([np.linspace(0, 0.99, 100), 1 - np.logspace(-2, -6, 40)]))


def _start_by_floor_grid(lx: np.ndarray, ly: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The best ``(la, alpha, c)`` over a grid of c in [0, min y), a/alpha by log-log least squares."""
    y_min = float(y.min())
    best = (math.inf, None)
    for t in _FLOOR_GRID:
        theta = np.array([*_loglinear(lx, np.log(y - t * y_min)), t * y_min])
        s = _sse(theta, lx, ly)
        if s < best[0]:
            best = (s, theta)
    return best[1]


def floor_grid_starts(x: Sequence[float], y_BN: np.ndarray) -> np.ndarray:
    """The start :func:`fit_power_law` takes from its grid over the floor c, for ``B`` sets of ``y`` at the same
    ``x`` at once, ``[B, 3]`` ``(log a, alpha, c)``: the same grid and choice, each line fitted in closed form
    (equal to the one-at-a-time start up to rounding, ~100x faster; for bootstrap refits)."""
    lx = np.log(np.asarray(x, dtype=np.float64))
    y = np.asarray(y_BN, dtype=np.float64)
    c = _FLOOR_GRID[None, :, None] * y.min(axis=1)[:, None, None]  # [B, K, 1]
    z = np.log(y[:, None, :] - c)  # [B, K, N]: log(y - c) = la - alpha lx, a line per grid point
    dx = lx - lx.mean()
    alpha = -(z * dx).sum(-1) / (dx @ dx)
    la = z.mean(-1) + alpha * lx.mean()
    m = np.exp(np.clip(la[..., None] - alpha[..., None] * lx, -700, 700)) + c
    best = np.argmin(((np.log(y)[:, None, :] - np.log(m)) ** 2).sum(-1), axis=1)
    rows = np.arange(y.shape[0])
    return np.stack([la[rows, best], alpha[rows, best], c[rows, best, 0]], axis=1)


def _least_squares(theta0: np.ndarray, lx: np.ndarray, ly: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimize the log-space SSE over ``(la, alpha, c >= 0)`` from ``theta0``; (theta, Jacobian)."""
    from scipy.optimize import least_squares

    # x is centred in log space so log a and alpha are not nearly collinear (x ~ 1e9 otherwise).
    mid = float(lx.mean())
    lxc = lx - mid
    start = np.array([theta0[0] - theta0[1] * mid, theta0[1], max(theta0[2], 0.0)])
    res = least_squares(lambda t: ly - _model_log(t, lxc)[0], start, jac=lambda t: -_model_log(t, lxc)[1],
                        bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, np.inf]), method="trf",
                        x_scale="jac", ftol=_TOL, xtol=_TOL, gtol=_TOL, max_nfev=2000)
    theta = np.array([res.x[0] + res.x[1] * mid, res.x[1], res.x[2]])
    return theta, _model_log(res.x, lxc)[1]


def _standard_errors(J: np.ndarray, resid: np.ndarray, n_par: int) -> tuple[float | None, float | None]:
    n = resid.size
    if n <= n_par:
        return None, None
    s2 = float(resid @ resid) / (n - n_par)
    try:
        cov = s2 * np.linalg.inv(J.T @ J)
    except np.linalg.LinAlgError:
        return None, None
    c_se = float(math.sqrt(max(cov[2, 2], 0.0))) if n_par == 3 else None
    return float(math.sqrt(max(cov[1, 1], 0.0))), c_se


def fit_power_law(x: Sequence[float], y: Sequence[float], *, irreducible: bool = True,
                  what: str = "power-law fit", interval_level: float | None = 0.95,
                  start: Sequence[float] | None = None) -> PowerLaw:
    """Fit ``y = a x^-alpha + c`` (``c = 0`` unless ``irreducible``); see the module docstring.

    ``what`` names the data in error messages. Needs 3 points with an irreducible term (2 without).
    ``interval_level``: confidence of alpha's profile-likelihood interval (None: not computed).
    ``start``: the floor grid's start ``(log a, alpha, c)`` when already computed (:func:`floor_grid_starts`).
    """
    x, y = _check(x, y, what, 3 if irreducible else 2)
    lx, ly = np.log(x), np.log(y)
    if irreducible:
        theta0 = _start_by_floor_grid(lx, ly, y) if start is None else np.asarray(start, dtype=np.float64)
        theta, J = _least_squares(theta0, lx, ly)
    else:  # linear in log space: the least-squares solution is exact
        theta = np.array([*_loglinear(lx, ly), 0.0])
        J = _model_log(theta, lx)[1][:, :2]
    resid = ly - _model_log(theta, lx)[0]
    n_par = 3 if irreducible else 2
    alpha_se, c_se = _standard_errors(J, resid, n_par)
    law = PowerLaw(a=float(math.exp(theta[0])), alpha=float(theta[1]), c=float(theta[2]), n_points=x.size,
                   rmse_log=float(math.sqrt(np.mean(resid ** 2))), residuals_log=[float(v) for v in resid],
                   alpha_se=alpha_se, c_se=c_se, irreducible=irreducible)
    if interval_level is not None:
        law.alpha_interval, law.alpha_interval_note = alpha_profile_interval(x, y, law, interval_level)
        law.interval_level = interval_level
    return law


# ---- the profile-likelihood interval of alpha ------------------------------------------------------
def profile_sse(alpha: float, x: Sequence[float], y: Sequence[float], *, irreducible: bool = True) -> float:
    """Smallest log-space SSE of ``a x^-alpha + c`` with alpha held fixed (a > 0 and c >= 0 refitted)."""
    from scipy.optimize import least_squares, nnls

    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    if not irreducible:  # log a = mean(log y + alpha log x) exactly
        r = ly + alpha * lx
        return float(np.sum((r - r.mean()) ** 2))
    # u = (x / x_ref)^-alpha lies in (0, 1] (x_ref: the end where the term is largest), so extreme
    # alphas neither overflow nor underflow the fit of the prefactor.
    ref = lx.min() if alpha >= 0 else lx.max()
    u = np.exp(np.clip(-alpha * (lx - ref), -700, 0))
    yv = np.exp(ly)
    # Start: least squares in relative error with a, c >= 0 (close to the log objective), then refine.
    (a0, c0), _ = nnls(np.stack([u / yv, 1 / yv], axis=1), np.ones_like(yv))
    start = np.array([math.log(max(a0, 1e-12 * yv.min())), c0])

    def model(t):
        p = np.exp(np.clip(t[0], -700, 700)) * u
        m = p + t[1]
        return np.log(m), np.stack([p / m, 1.0 / m], axis=1)

    res = least_squares(lambda t: ly - model(t)[0], start, jac=lambda t: -model(t)[1],
                        bounds=([-np.inf, 0.0], [np.inf, np.inf]), method="trf", x_scale="jac",
                        ftol=_TOL, xtol=_TOL, gtol=_TOL, max_nfev=2000)
    return float(2 * res.cost)


def _search_limits(lx: np.ndarray, alpha: float) -> tuple[float, float]:
    """Alphas beyond which the law is flat over the data (the profile cannot change any more)."""
    s = np.unique(lx)
    hi = _FLAT / (s[1] - s[0])   # x^-alpha is ~0 at every x but the smallest
    lo = -_FLAT / (s[-1] - s[-2])  # ... at every x but the largest
    return min(lo, alpha - 1.0), max(hi, alpha + 1.0)


def _crossing(f: Callable[[float], float], alpha: float, step: float, limit: float) -> float | None:
    """Where ``f`` (<= 0 at alpha) first rises above 0 going from alpha towards limit; None: never."""
    from scipy.optimize import brentq

    if not (math.isfinite(step) and step > 0):  # an undefined standard error: a small step, still doubling
        step = 1e-3 * max(abs(alpha), 1e-3)
    inner, d, span = alpha, step, abs(limit - alpha)
    while True:
        # The limit is reached by comparing the distances: alpha + (limit - alpha) may miss limit by an ulp.
        reached = d >= span
        outer = limit if reached else alpha + math.copysign(d, limit - alpha)
        if f(outer) > 0:
            return float(brentq(f, inner, outer, xtol=1e-12 * max(1.0, abs(alpha)), rtol=1e-12))
        if reached:
            return None
        inner, d = outer, 2 * d


def alpha_profile_interval(x: Sequence[float], y: Sequence[float], law: PowerLaw,
                           level: float = 0.95) -> tuple[list[float | None] | None, str | None]:
    """``([low, high], note)``: the profile-likelihood interval of ``law.alpha`` (see the module docstring).

    ``([None, None] or None, reason)`` when it is unbounded or undefined; ``x``/``y`` are the fitted data.
    """
    from scipy.stats import f as f_dist

    lx = np.log(np.asarray(x, dtype=np.float64))
    n_par = 3 if law.irreducible else 2
    dof = law.n_points - n_par
    if dof <= 0:
        return None, (f"undefined: {law.n_points} points for {n_par} parameters leave no residual variance "
                      "(the curve passes through every point)")
    if law.irreducible and np.unique(lx).size < 3:
        return None, "undefined: a floor and an exponent need at least 3 distinct x values"
    # The minimum as the profile itself computes it, so the search starts at or below the threshold.
    sse_min = profile_sse(law.alpha, x, y, irreducible=law.irreducible)
    threshold = sse_min * (1 + float(f_dist.ppf(level, 1, dof)) / dof)
    excess = lambda a: profile_sse(a, x, y, irreducible=law.irreducible) - threshold  # noqa: E731
    step = law.alpha_se if law.alpha_se else 1e-3 * max(abs(law.alpha), 1e-3)
    if law.irreducible:
        lo_limit, hi_limit = _search_limits(lx, law.alpha)
    else:  # quadratic profile: always crosses; the limits only stop a runaway search
        lo_limit, hi_limit = law.alpha - 1e6 * max(step, 1.0), law.alpha + 1e6 * max(step, 1.0)
    low = _crossing(excess, law.alpha, step, lo_limit)
    high = _crossing(excess, law.alpha, step, hi_limit)
    open_sides = [f"below (every alpha down to {lo_limit:.3g} fits)" if low is None else "",
                  f"above (every alpha up to {hi_limit:.3g} fits)" if high is None else ""]
    note = None
    if low is None or high is None:
        note = ("unbounded " + " and ".join(s for s in open_sides if s)
                + ": the floor c trades against the exponent over these points; more sizes, spread wider, pin it")
    return [low, high], note


__all__ = ["FitError", "PowerLaw", "alpha_profile_interval", "fit_power_law", "floor_grid_starts", "profile_sse"]
