"""Prediction-powered estimates from an audit share (pure functions on running sums).

The audit judges a uniformly random sample of the pairs the router left to the PM; the PM predicts, for every one
of those pairs, how likely it is to agree with the judge (``f = σ(|d|)``, its own confidence). Prediction-powered
inference (Angelopoulos et al., Science 2023; the power-tuned "PPI++", 2024) estimates the mean agreement over all
those pairs as ``λ·mean_N(f) + mean_n(y − λ·f)``: the many predictions carry the estimate, the few judged pairs
correct their bias, and ``λ`` (fitted on the sums) makes it never worse than the audit mean alone (λ = 0).

Everything is a sum (counts, Σf, Σf², Σy, Σy², Σyf), so ranks and steps add their sums and the estimate needs no
stored pairs. :func:`routing_estimates` turns one such estimate into the three numbers a run reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist


@dataclass
class PPISums:
    """Sufficient statistics: the pool (all pairs the estimate is about) and the labelled (audited) pairs.

    ``pool_n``, ``pool_f``, ``pool_f2``: count, Σf, Σf² over the pool; ``n``, ``y``, ``y2``, ``f``, ``f2``, ``yf``:
    count, Σy, Σy², Σf, Σf², Σy·f over the labelled pairs (a uniform sample of the pool).
    """

    pool_n: float = 0.0
    pool_f: float = 0.0
    pool_f2: float = 0.0
    n: float = 0.0
    y: float = 0.0
    y2: float = 0.0
    f: float = 0.0
    f2: float = 0.0
    yf: float = 0.0


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def ppi_mean(s: PPISums, level: float = 0.95) -> tuple[float, float, float]:
    """PPI++ estimate of the pool's mean label with its normal ``level`` interval: ``(estimate, lo, hi)``.

    With ``N`` pool and ``n`` labelled pairs: ``λ = cov(y, f) / ((1 + n/N)·var(f))`` clipped to [0, 1],
    ``θ̂ = λ·f̄_N + ȳ_n − λ·f̄_n``, ``Var θ̂ = λ²·var_N(f)/N + var_n(y − λf)/n``. Needs ``n ≥ 2``. With labels in
    [0, 1] the interval is clipped to [0, 1]. When every labelled pair has the same label, the variance of the
    labels is taken from the Agresti–Coull proportion ``(Σy + 2)/(n + 4)`` rather than 0.
    """
    if s.n < 2:
        raise ValueError("ppi: need at least two labelled pairs")
    n, big = s.n, max(s.pool_n, s.n)
    y_bar, f_bar = s.y / n, s.f / n
    var_y = max(s.y2 / n - y_bar**2, 0.0)
    var_f_lab = max(s.f2 / n - f_bar**2, 0.0)
    cov = s.yf / n - y_bar * f_bar
    if var_y < 1e-12:  # every audited pair agreed (or none did): the plug-in variance 0 would claim certainty;
        smoothed = (s.y + 2.0) / (n + 4.0)  # use the Agresti–Coull proportion's instead (labels in [0, 1])
        var_y, cov = smoothed * (1 - smoothed), 0.0
    pool_f_bar = s.pool_f / big if s.pool_n else f_bar
    var_f_pool = max(s.pool_f2 / big - pool_f_bar**2, 0.0) if s.pool_n else var_f_lab
    var_f = 0.5 * (var_f_lab + var_f_pool)
    lam = min(max(cov / ((1 + n / big) * var_f), 0.0), 1.0) if var_f > 1e-12 and s.pool_n else 0.0
    estimate = lam * pool_f_bar + y_bar - lam * f_bar
    var_rect = max(var_y - 2 * lam * cov + lam**2 * var_f_lab, 0.0) * n / (n - 1)  # unbiased for y − λf
    se = math.sqrt(lam**2 * var_f_pool / big + var_rect / n)
    half = _z(level) * se
    return estimate, max(estimate - half, 0.0), min(estimate + half, 1.0)


def routing_estimates(routed_n: float, routed_agree: float, left_n: float, left: tuple[float, float, float]) -> dict:
    """The run's three numbers from the agreement of the pairs left to the PM, estimated with its interval.

    Args:
        routed_n: Pairs the router sent to the judge (judged).
        routed_agree: Their PM–judge agreements summed (observed on every routed pair: no sampling error).
        left_n: Pairs left to the PM.
        left: ``(estimate, lo, hi)`` of the mean PM–judge agreement over the pairs left to the PM.

    Returns:
        Each as ``(estimate, lo, hi)``: ``system`` (the routed system's agreement with the judge: the judge's
        answer on routed pairs, the PM's elsewhere), ``pm`` (the PM's agreement with the judge over all pairs), and
        ``gain`` (the routed system minus random routing with as many judge calls, in expectation:
        ``(K/N)·(M/N)·(a_left − a_routed)`` with K routed, M left, N = K + M).
    """
    n = routed_n + left_n
    if n <= 0:
        raise ValueError("routing_estimates: no pairs")
    a_routed = routed_agree / routed_n if routed_n else 0.0
    share_routed, share_left = routed_n / n, left_n / n

    def system(a):
        return share_routed + share_left * a

    def pm(a):
        return share_routed * a_routed + share_left * a

    def gain(a):
        return share_routed * share_left * (a - a_routed)

    return {name: tuple(fn(a) for a in left) for name, fn in (("system", system), ("pm", pm), ("gain", gain))}


def verdict(gain: tuple[float, float, float], level: float = 0.95) -> str:
    """One line a user reads: whether routing beat random at the same calls, by the gain's interval."""
    estimate, lo, hi = gain
    pm_ = (hi - lo) / 2
    pct = f"{100 * estimate:+.1f} ± {100 * pm_:.1f} points of agreement with the judge ({level:.0%} interval)"
    if lo > 0:
        return f"routing pays off: {pct}"
    if hi < 0:
        return f"routing does worse than random: {pct}"
    return f"not distinguishable from random: {pct}"
