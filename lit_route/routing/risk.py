"""Risk-controlled routing: the largest τ such that, among the pairs left to the PM (ū ≤ τ), the PM disagrees with
the judge at most a share α of the time, with probability at least 1 − δ over the calibration set.

Learn-then-Test (Angelopoulos et al., 2021) with fixed-sequence testing: for each candidate τ, from the smallest
(fewest pairs left to the PM, least risk) upwards, test the null "disagreement among pairs with ū ≤ τ exceeds α"
on the calibration pairs with ū ≤ τ, using a p-value valid for losses in [0, 1] (Hoeffding–Bentkus) or for 0/1
losses (exact binomial). Stop at the first τ whose null is not rejected at level δ; the answer is the last τ
rejected. Fixed-sequence testing spends the whole δ on each test and still bounds the chance of any false
rejection by δ, whatever the shape of the risk curve. The calibration pairs must be a uniformly random sample of
the pairs routed later (an audit share, or a random split of a labelled file): pairs the router chose are not.

A tie (the judge says neither) counts as half a disagreement.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from lit_route.checks import check_choice, check_fraction, check_nonnegative
from lit_route.routing.controller import _quantile_tau

METHODS = ("hb", "binomial")


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Bin(n, p) ≤ k)``, summed exactly in log space."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    terms = [log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q for i in range(k + 1)]
    top = max(terms)  # log-sum-exp: the terms underflow one by one for large n
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def hb_pvalue(risk_hat: float, n: int, alpha: float) -> float:
    """Hoeffding–Bentkus p-value of the null "mean loss > α" from ``n`` losses in [0, 1] with mean ``risk_hat``.

    ``min(exp(−n·h(min(r̂, α), α)), e·P(Bin(n, α) ≤ ⌈n·r̂⌉))`` with ``h(a, b) = a·log(a/b) + (1−a)·log((1−a)/(1−b))``
    (Bates et al. 2021, "Distribution-free, risk-controlling prediction sets", Prop. 3).
    """
    if n <= 0:
        return 1.0
    a = min(risk_hat, alpha)
    h = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    hoeffding = math.exp(-n * h)
    bentkus = math.e * binomial_cdf(math.ceil(n * risk_hat - 1e-9), n, alpha)
    return min(1.0, hoeffding, bentkus)


def binomial_pvalue(disagreements: float, n: int, alpha: float) -> float:
    """Exact p-value ``P(Bin(n, α) ≤ k)`` of the null "disagreement rate > α" for 0/1 losses; a half (tie) is
    rounded up to a whole disagreement, which keeps the test valid (conservative)."""
    return binomial_cdf(math.ceil(disagreements - 1e-9), n, alpha)


def pvalue(losses: torch.Tensor, alpha: float, method: str = "hb") -> float:
    """p-value of "mean of ``losses`` (M,) in [0, 1] > α" by ``method`` (``hb`` or ``binomial``)."""
    n = losses.numel()
    if method == "binomial":
        return binomial_pvalue(float(losses.double().ceil().sum()), n, alpha)
    return hb_pvalue(float(losses.double().mean()) if n else 0.0, n, alpha)


def check_risk(prefix: str, alpha: float, delta: float, method: str) -> None:
    for name, value in (("alpha", alpha), ("delta", delta)):
        check_fraction(f"{prefix}{name}", value, open_low=True)
        if value >= 1:
            raise ValueError(f"{prefix}{name}: expected a number in (0, 1); got {value!r}")
    check_choice(f"{prefix}method", method, METHODS)


@functools.lru_cache(maxsize=64)
def start_pairs(alpha: float, delta: float, method: str = "hb", rate: float = 0.5) -> int:
    """Pairs left to the PM at which the test sequence starts: the fewest at which a disagreement of ``rate·α``
    would reject the null (rate 0: the fewest at which zero disagreements would).

    The first tests, on few pairs, have little power, and a fixed sequence ends at its first non-rejection; starting
    where a clearly safe τ would pass keeps early noise from ending it. The start depends on no label.
    """
    def rejects(n: int) -> bool:
        if method == "binomial":
            return binomial_pvalue(math.floor(rate * alpha * n), n, alpha) <= delta
        return hb_pvalue(rate * alpha, n, alpha) <= delta

    hi = 1
    while not rejects(hi):
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:  # the p-value falls with n at a fixed rate: bisect the first n that rejects
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if rejects(mid) else (mid, hi)
    return hi


@dataclass
class RiskChoice:
    """The outcome of :func:`risk_threshold`.

    Attributes:
        tau: The chosen τ (pairs with ū ≤ τ go to the PM), or ``None`` when no τ passed (judge every pair).
        n_left: Calibration pairs with ū ≤ τ.
        risk_hat: Their mean disagreement.
        p_value: The p-value of the last τ rejected.
        tested: Candidates tested (the last one not rejected, unless all were).
    """

    tau: float | None
    n_left: int
    risk_hat: float
    p_value: float
    tested: int


def risk_threshold(u: torch.Tensor, loss: torch.Tensor, alpha: float, delta: float, grid: torch.Tensor | None = None,
                   method: str = "hb", start: int | None = None) -> RiskChoice:
    """Chooses τ by Learn-then-Test over the candidates in ``grid`` (ascending), fixed-sequence.

    Args:
        u: (M,) calibration pairs' uncertainties ū.
        loss: (M,) their disagreement between PM and judge in [0, 1] (1 disagree, 0.5 tie, 0 agree).
        alpha: Tolerated disagreement among the pairs left to the PM.
        delta: Tolerated chance that the calibration set misleads (the guarantee holds with probability 1 − δ).
        grid: (G,) candidate thresholds; default: 100 quantiles of the calibration ū. A grid from unlabelled ū
            (the current step's, say) depends on no label.
        method: ``hb`` (Hoeffding–Bentkus, any loss in [0, 1]) or ``binomial`` (exact; ties count as disagreement).
        start: Fewest pairs left to the PM of the first τ tested (default :func:`start_pairs`).

    Returns:
        A :class:`RiskChoice`.
    """
    check_risk("risk.", alpha, delta, method)
    if u.numel() != loss.numel():
        raise ValueError(f"risk: {u.numel()} uncertainties but {loss.numel()} losses")
    u, loss = u.double().flatten(), loss.double().flatten()
    if bool(((loss < 0) | (loss > 1)).any()):
        raise ValueError("risk: losses must lie in [0, 1]")
    order = torch.argsort(u, stable=True)
    u_sorted, loss_sorted = u[order], loss[order]
    cum_loss = torch.cat([torch.zeros(1, dtype=torch.float64), loss_sorted.cumsum(0)])
    cum_ceil = torch.cat([torch.zeros(1, dtype=torch.float64), loss_sorted.ceil().cumsum(0)])
    candidates = torch.unique(quantile_grid(u_sorted) if grid is None else grid.double().flatten())
    counts = torch.searchsorted(u_sorted, candidates, right=True)  # pairs with ū ≤ τ
    first = start_pairs(alpha, delta, method) if start is None else start
    choice = RiskChoice(None, 0, 0.0, 1.0, 0)
    for tau, n in zip(candidates.tolist(), counts.tolist(), strict=True):
        if n < first:  # decided by ū alone, before any loss is seen: not part of the sequence
            continue
        choice.tested += 1
        if method == "binomial":
            p = binomial_pvalue(float(cum_ceil[n]), n, alpha)
        else:
            p = hb_pvalue(float(cum_loss[n]) / n, n, alpha)
        if p > delta:
            break
        choice = RiskChoice(tau, n, float(cum_loss[n]) / n, p, choice.tested)
    return choice


def quantile_grid(u: torch.Tensor, size: int = 100) -> torch.Tensor:
    """``size`` evenly spaced quantiles of ``u`` (any shape): a label-free grid of candidate τ (G,)."""
    flat = u.detach().double().flatten()
    return torch.quantile(flat, torch.linspace(0, 1, size, dtype=torch.float64)) if flat.numel() else flat


class RiskController:
    """A controller (``controller:`` slot of the routing callback) that holds the PM's disagreement with the judge,
    among the pairs it leaves to the PM, at most ``alpha`` with probability ``1 − delta``.

    It learns from the audit share: the decision code passes each audited pair's ū and PM–judge agreement to
    :meth:`observe`. Until ``min_calibration`` audit pairs are in, τ follows the budget target (the quantile of ū
    that judges the target share). After each step, τ is chosen by :func:`risk_threshold` on the last
    ``window`` audit pairs, over a grid of that step's ū quantiles; when no τ passes, every pair is routed (the
    budget caps still apply). The guarantee holds for pairs exchangeable with the calibration pairs: under a
    drifting policy (the PM's disagreement at a fixed ū rising step by step) the window's older pairs understate
    the current risk and it can be exceeded on more than a δ share of steps; a smaller ``window`` follows a drift
    faster at the cost of power (docs/statistics.md).

    Args:
        alpha: Tolerated disagreement among pairs left to the PM.
        delta: Tolerated chance of exceeding it.
        method: ``hb`` or ``binomial`` (see :func:`risk_threshold`).
        window: Most recent audit pairs kept for calibration.
        min_calibration: Audit pairs needed before τ is set by the risk test.
    """

    def __init__(self, alpha: float = 0.1, delta: float = 0.1, method: str = "hb", window: int = 4096,
                 min_calibration: int | None = None):
        check_risk("controller.", alpha, delta, method)
        check_nonnegative("controller.window", window, integer=True, positive=True)
        self.alpha, self.delta, self.method, self.window = alpha, delta, method, window
        self.min_calibration = min_calibration if min_calibration is not None else start_pairs(alpha, delta, method)
        self.tau: float | None = None
        self.u_cal: list[float] = []
        self.loss_cal: list[float] = []
        self.last: RiskChoice | None = None

    def observe(self, u, agree) -> None:
        """Audit pairs' ū and agreement with the judge (1 agree, 0.5 tie, 0 disagree): scalars or tensors."""
        u_t = torch.as_tensor(u, dtype=torch.float64).detach().flatten().cpu()
        a_t = torch.as_tensor(agree, dtype=torch.float64).detach().flatten().cpu()
        self.u_cal.extend(u_t.tolist())
        self.loss_cal.extend((1.0 - a_t).clamp(0.0, 1.0).tolist())
        del self.u_cal[: -self.window], self.loss_cal[: -self.window]

    def calibrate(self, u: torch.Tensor, target: float) -> None:
        self.tau = _quantile_tau(u, target)

    def threshold(self, u: torch.Tensor) -> float:
        if self.tau is None:
            raise RuntimeError("controller: call calibrate() or update() before threshold()")
        return self.tau

    def update(self, u: torch.Tensor, target: float) -> None:
        u = u.detach().double().cpu()  # the calibration lives on the CPU; a step's ū may not
        if len(self.u_cal) < self.min_calibration:
            self.calibrate(u, target)
            return
        self.last = risk_threshold(torch.tensor(self.u_cal), torch.tensor(self.loss_cal), self.alpha, self.delta,
                                   grid=quantile_grid(u), method=self.method)
        self.tau = self.last.tau if self.last.tau is not None else float(u.double().min()) - 1e-9

    def state_dict(self) -> dict:
        return {"tau": self.tau, "u_cal": list(self.u_cal), "loss_cal": list(self.loss_cal)}

    def load_state_dict(self, state: dict) -> None:
        self.tau, self.u_cal, self.loss_cal = state["tau"], list(state["u_cal"]), list(state["loss_cal"])
