"""Power laws with an irreducible term, ``y = a * x^(-alpha) + c``, fitted without scipy.

Used twice: the LM loss against training tokens (compute-equivalent, paper §4.1) and the SAE's
nMSE against its number of latents (the scaling study, paper §3).

**Objective.** Residuals are taken in log space, ``r_i = log y_i - log(a x_i^-alpha + c)``, so
every point counts by its *relative* error (losses of 3 nats and nMSEs of 0.1 are fitted alike,
and the many points near the floor do not swamp the few far above it). Parameters: ``a > 0``,
``alpha`` (any sign; a decreasing law has ``alpha > 0``), ``c >= 0`` (``c = 0`` with
``irreducible=False``).

**Method.** (1) Profile over ``c``: for each ``c`` on a grid in ``[0, min y)``, denser near
``min y``, ``log(y - c) = log a - alpha log x`` is a linear least-squares problem; the grid point
whose curve has the smallest log-space objective is kept. (2) Levenberg-Marquardt on
``(log a, alpha, c)`` with the analytic Jacobian, from that start, with ``c`` kept ``>= 0``.
Standard errors come from ``s^2 (J^T J)^-1`` with ``s^2 = SSE / (n - p)`` (None when n = p).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from saelab.errors import SaelabError


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

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.a * np.power(x, -self.alpha) + self.c

    def invert(self, y: float) -> float:
        """The x at which the law reaches ``y``; inf when ``y <= c`` for a decreasing law (never reached)."""
        if y - self.c <= 0:
            return math.inf if self.alpha > 0 else 0.0
        if self.alpha == 0:
            return math.nan
        return float((self.a / (y - self.c)) ** (1.0 / self.alpha))

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


def _model_log(theta: np.ndarray, lx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    la, alpha, c = theta
    p = np.exp(np.clip(la - alpha * lx, -700, 700))
    m = p + c
    return np.log(m), p, m


def _sse(theta: np.ndarray, lx: np.ndarray, ly: np.ndarray) -> float:
    f, _, m = _model_log(theta, lx)
    if not np.all(m > 0):
        return math.inf
    return float(np.sum((ly - f) ** 2))


def _levenberg_marquardt(theta: np.ndarray, lx: np.ndarray, ly: np.ndarray, fit_c: bool,
                         steps: int = 200) -> tuple[np.ndarray, np.ndarray]:
    lam = 1e-3
    sse = _sse(theta, lx, ly)
    J = None
    for _ in range(steps):
        f, p, m = _model_log(theta, lx)
        r = ly - f
        J = np.stack([p / m, -lx * p / m, 1.0 / m], axis=1)
        if not fit_c:
            J = J[:, :2]
        g = J.T @ r
        H = J.T @ J
        improved = False
        for _ in range(30):
            step = np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-12), g)
            cand = theta.copy()
            cand[: step.size] += step
            if fit_c:
                cand[2] = max(cand[2], 0.0)
            cand_sse = _sse(cand, lx, ly)
            if cand_sse < sse:
                done = sse - cand_sse <= 1e-15 * max(sse, 1e-300)
                theta, sse, lam = cand, cand_sse, max(lam / 10, 1e-12)
                improved = True
                break
            lam *= 10
        if not improved or done:
            break
    f, p, m = _model_log(theta, lx)
    J = np.stack([p / m, -lx * p / m, 1.0 / m], axis=1)
    return theta, (J if fit_c else J[:, :2])


def fit_power_law(x: Sequence[float], y: Sequence[float], *, irreducible: bool = True,
                  what: str = "power-law fit") -> PowerLaw:
    """Fit ``y = a x^-alpha + c`` (``c = 0`` unless ``irreducible``); see the module docstring.

    ``what`` names the data in error messages. Needs 3 points with an irreducible term (2 without).
    """
    x, y = _check(x, y, what, 3 if irreducible else 2)
    lx, ly = np.log(x), np.log(y)
    if irreducible:
        y_min = float(y.min())
        # c / y_min on [0, 1): uniform, plus points crowding 1 (where the floor is nearly reached).
        grid = np.unique(np.concatenate([np.linspace(0, 0.99, 100), 1 - np.logspace(-2, -6, 40)]))
        best = (math.inf, None)
        for t in grid:
            c = t * y_min
            la, alpha = _loglinear(lx, np.log(y - c))
            theta = np.array([la, alpha, c])
            s = _sse(theta, lx, ly)
            if s < best[0]:
                best = (s, theta)
        theta0 = best[1]
    else:
        la, alpha = _loglinear(lx, ly)
        theta0 = np.array([la, alpha, 0.0])
    theta, J = _levenberg_marquardt(theta0, lx, ly, irreducible)
    f, _, _ = _model_log(theta, lx)
    resid = ly - f
    n, n_par = x.size, (3 if irreducible else 2)
    alpha_se = c_se = None
    if n > n_par:
        s2 = float(resid @ resid) / (n - n_par)
        try:
            cov = s2 * np.linalg.inv(J.T @ J)
            alpha_se = float(math.sqrt(max(cov[1, 1], 0.0)))
            if irreducible:
                c_se = float(math.sqrt(max(cov[2, 2], 0.0)))
        except np.linalg.LinAlgError:
            pass
    return PowerLaw(a=float(math.exp(theta[0])), alpha=float(theta[1]), c=float(theta[2]), n_points=n,
                    rmse_log=float(math.sqrt(np.mean(resid ** 2))), residuals_log=[float(v) for v in resid],
                    alpha_se=alpha_se, c_se=c_se, irreducible=irreducible)


__all__ = ["FitError", "PowerLaw", "fit_power_law"]
