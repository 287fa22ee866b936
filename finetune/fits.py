"""Scaling fits for the study: loss against fine-tuning set size N as L(N) = E + A / N^alpha, fitted in log space with
a Huber loss from a grid of starting points (as the Chinchilla replications fit their laws: Hoffmann et al. 2022,
Besiroglu et al. 2024), with scipy; the gain of one arm over another, the crossover N* where that gain falls below a
tolerance, and bootstrap intervals over evaluation items and seeds.

Fitting log L rather than L weighs every point by its relative error, so the large-N points, where the losses are
close together and the question is decided, count as much as the small-N ones."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np


@dataclass
class PowerLaw:
    E: float
    A: float
    alpha: float
    loss: float = 0.0
    """The Huber objective at the optimum."""

    def __call__(self, n):
        return self.E + self.A / np.power(np.asarray(n, dtype=float), self.alpha)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _objective(theta, log_n, log_l, delta):
    a, alpha, e = theta
    pred = np.logaddexp(a - alpha * log_n, e)  # log(A / N^alpha + E), with A = e^a, E = e^e
    return _huber(pred - log_l, delta).sum()


def fit_power_law(n, loss, starts: int = 64, delta: float = 1e-3, around: PowerLaw | None = None) -> PowerLaw:
    """L(N) = E + A / N^alpha through the points (n, loss), n > 0: the best of the L-BFGS-B optima from `starts`
    starting points on a grid, and from `around` (an earlier fit) when given; `around` with starts=1 refines that
    fit alone (the bootstrap's refits: each resample moves the points a little, and the optimum with them)."""
    from scipy.optimize import minimize

    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    if len(n) < 3 or (n <= 0).any() or (loss <= 0).any():
        raise ValueError(f"a power law needs three points or more with N > 0 and loss > 0, got N={n}, L={loss}")
    log_n, log_l = np.log(n), np.log(loss)
    low = math.log(loss.min())
    side = max(2, round(starts ** (1 / 3)))
    grid = [
        np.array(p)
        for p in itertools.product(
            np.linspace(0.0, 10.0, side), np.linspace(0.05, 1.5, side), np.linspace(low - 2.0, low - 0.01, side)
        )
    ]
    if around is not None:  # a refit: from the earlier optimum (and the grid, unless starts is 1: the bootstrap's)
        center = np.array([math.log(max(around.A, 1e-12)), around.alpha, math.log(max(around.E, 1e-12))])
        grid = [center] if starts <= 1 else [center, *grid]
    bounds = [(-20.0, 40.0), (0.0, 3.0), (low - 10.0, low + 1.0)]
    best = None
    for start in grid:
        start = np.clip(start, [b[0] for b in bounds], [b[1] for b in bounds])
        result = minimize(_objective, start, args=(log_n, log_l, delta), method="L-BFGS-B", bounds=bounds)
        if best is None or result.fun < best.fun:
            best = result
    a, alpha, e = best.x
    return PowerLaw(E=math.exp(e), A=math.exp(a), alpha=float(alpha), loss=float(best.fun))


@dataclass
class Crossover:
    n_star: float | None
    status: str
    """below-at-start (the gain is under the tolerance at the smallest N), within (N* inside the data),
    extrapolated (N* beyond the largest N), never (the fitted gain stays above the tolerance: it levels off at
    `asymptote`)."""
    asymptote: float


def crossover(base: PowerLaw, other: PowerLaw, tolerance: float, n_min: float, n_max: float) -> Crossover:
    """Where base(N) - other(N), the gain of `other`, first falls below `tolerance`, searched from n_min to 1e12."""
    grid = np.logspace(math.log10(n_min), 12, 4000)
    gain = base(grid) - other(grid)
    below = gain < tolerance
    asymptote = base.E - other.E
    if below[0]:
        return Crossover(float(n_min), "below-at-start", asymptote)
    if not below.any():
        return Crossover(None, "never", asymptote)
    n_star = float(grid[int(np.argmax(below))])
    return Crossover(n_star, "within" if n_star <= n_max else "extrapolated", asymptote)


def percentile_interval(values, level: float = 0.95) -> tuple[float, float] | None:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(values) < 2:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
