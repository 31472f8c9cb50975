"""Routing curves: accuracy as a function of the share of pairs sent to the judge (pure functions).

``pm_correct`` (N,) is 1 where the PM ranks the pair right; ``judge_score`` (N,) is the judge's credit for the
pair (1 right, 0.5 tie, 0 wrong), already falling back to ``pm_correct`` where the judge failed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_route.routing.routers import count_for_fraction


def routed_accuracy(pm_correct: torch.Tensor, judge_score: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean credit when the pairs in ``mask`` take the judge's answer and the rest the PM's. Shapes (N,)."""
    return float(torch.where(mask, judge_score.double(), pm_correct.double()).mean())


def curve_for_order(
    order: torch.Tensor, pm_correct: torch.Tensor, judge_score: torch.Tensor, fractions: Sequence[float]
) -> list[float]:
    """Accuracy at each fraction when pairs are judged in the priority ``order`` (N,) (first = judged first)."""
    n = pm_correct.numel()
    gain = (judge_score.double() - pm_correct.double())[order]
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), gain.cumsum(0)])
    base = float(pm_correct.double().sum())
    return [(base + float(cumulative[count_for_fraction(n, f)])) / n for f in fractions]


def random_expected_curve(pm_correct: torch.Tensor, judge_score: torch.Tensor, fractions: Sequence[float]) -> list[float]:
    """Expected accuracy of judging k = round(f·N) uniformly random pairs: ``acc_PM + (k/N)·mean(judge − PM)``."""
    n = pm_correct.numel()
    pm_acc = float(pm_correct.double().mean())
    mean_gain = float((judge_score.double() - pm_correct.double()).mean())
    return [pm_acc + count_for_fraction(n, f) / n * mean_gain for f in fractions]


def area_under_curve(fractions: Sequence[float], accuracy: Sequence[float]) -> float:
    """Trapezoidal area under accuracy-vs-fraction (fractions in [0, 1]; a flat curve at a has area a)."""
    x = torch.tensor(list(fractions), dtype=torch.float64)
    y = torch.tensor(list(accuracy), dtype=torch.float64)
    return float(torch.trapezoid(y, x) / (x[-1] - x[0])) if len(x) > 1 else float(y[0])


def uncertainty_order(u: torch.Tensor) -> torch.Tensor:
    """Most uncertain first (ties by position)."""
    return torch.argsort(u.double(), descending=True, stable=True)


def margin_order(d: torch.Tensor) -> torch.Tensor:
    """Smallest |d| first."""
    return torch.argsort(d.abs().double(), stable=True)


def oracle_order(d: torch.Tensor, judge_score: torch.Tensor) -> torch.Tensor:
    """The best any router could do with this judge: the pairs where the judge gains most over the PM first."""
    pm_correct = (d > 0).double()
    return torch.argsort(judge_score.double() - pm_correct, descending=True, stable=True)
