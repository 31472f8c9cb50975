"""Accuracy against judge *cost* for a strong judge alone, a cheap judge alone, and cascades of both.

Inputs are per pair (N,): ``pm_correct`` (1 if the PM ranks it right), each judge's credit (1 right, 0.5 tie,
0 wrong; already falling back to the PM where the judge failed), each judge's cost for the pair, and whether the
cheap judge was unsure (its two display orders disagreed, or it failed). ``order`` is the routing priority
(most uncertain first).

- ``strong`` / ``cheap``: the top share of pairs goes to that judge alone;
- ``bands``: the top share ``a`` to the strong judge, the next ``b`` to the cheap one, over a grid of (a, b);
  the Pareto frontier (most accuracy for the cost) is kept;
- ``escalate``: the top share goes to the cheap judge, and the pairs where it is unsure go on to the strong one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_route.routing.cascade import cascade_bands
from lit_route.routing.routers import count_for_fraction
from lit_route.types import Preference


def single_judge_curve(order, pm_correct, score, cost, fractions: Sequence[float]) -> dict[str, list[float]]:
    """Top share ``f`` to one judge: ``{"fraction", "cost", "accuracy"}`` lists."""
    n = pm_correct.numel()
    gain = (score - pm_correct)[order].cumsum(0)
    spent = cost[order].cumsum(0)
    acc, usd = [], []
    for f in fractions:
        k = count_for_fraction(n, f)
        acc.append(float((pm_correct.sum() + (gain[k - 1] if k else 0.0)) / n))
        usd.append(float(spent[k - 1]) if k else 0.0)
    return {"fraction": list(fractions), "cost": usd, "accuracy": acc}


def band_grid(priority, pm_correct, strong, cheap, strong_cost, cheap_cost, step: float = 0.05) -> list[dict]:
    """Every (strong share a, cheap share b) on a grid with a + b ≤ 1: accuracy and cost of each."""
    points = []
    steps = round(1 / step)
    for i in range(steps + 1):
        for j in range(steps + 1 - i):
            a, b = i / steps, j / steps
            band = cascade_bands(priority, [a, b])
            credit = torch.where(band == 0, strong, torch.where(band == 1, cheap, pm_correct))
            cost = float(strong_cost[band == 0].sum() + cheap_cost[band == 1].sum())
            points.append({"strong_share": a, "cheap_share": b, "cost": cost, "accuracy": float(credit.mean())})
    return points


def pareto_frontier(points: list[dict]) -> list[dict]:
    """The points no other point beats on both cost (lower) and accuracy (higher), by increasing cost."""
    frontier, best = [], -1.0
    for p in sorted(points, key=lambda p: (p["cost"], -p["accuracy"])):
        if p["accuracy"] > best + 1e-12:
            frontier.append(p)
            best = p["accuracy"]
    return frontier


def escalation_curve(order, pm_correct, strong, cheap, strong_cost, cheap_cost, cheap_unsure,
                     fractions: Sequence[float]) -> dict[str, list[float]]:
    """Top share ``f`` to the cheap judge; where it is unsure, the strong judge answers (and is paid) too."""
    n = pm_correct.numel()
    acc, usd = [], []
    for f in fractions:
        top = order[: count_for_fraction(n, f)]
        credit = pm_correct.clone()
        credit[top] = torch.where(cheap_unsure[top], strong[top], cheap[top])
        usd.append(float(cheap_cost[top].sum() + strong_cost[top][cheap_unsure[top]].sum()))
        acc.append(float(credit.mean()))
    return {"fraction": list(fractions), "cost": usd, "accuracy": acc}


def best_at_cost(curve_cost: Sequence[float], curve_acc: Sequence[float], budget: float) -> float | None:
    """The best accuracy a curve reaches without spending more than ``budget`` (``None`` if none does)."""
    ok = [a for c, a in zip(curve_cost, curve_acc, strict=True) if c <= budget + 1e-12]
    return max(ok) if ok else None


def cascade_report(order, priority, pm_correct, strong, cheap, strong_cost, cheap_cost, cheap_unsure,
                   fractions: Sequence[float], budgets_share: Sequence[float] = (0.05, 0.1, 0.25, 0.5)) -> dict:
    """All four strategies, and the best accuracy each reaches at budgets given as shares of the cost of
    judging every pair with the strong judge."""
    pm_correct = pm_correct.double()
    strong_only = single_judge_curve(order, pm_correct, strong.double(), strong_cost.double(), fractions)
    cheap_only = single_judge_curve(order, pm_correct, cheap.double(), cheap_cost.double(), fractions)
    frontier = pareto_frontier(band_grid(priority, pm_correct, strong.double(), cheap.double(),
                                         strong_cost.double(), cheap_cost.double()))
    escalate = escalation_curve(order, pm_correct, strong.double(), cheap.double(), strong_cost.double(),
                                cheap_cost.double(), cheap_unsure, fractions)
    full = float(strong_cost.double().sum())
    at_budget = {}
    for share in budgets_share:
        budget = share * full
        at_budget[str(share)] = {
            "budget_usd": budget,
            "strong_only": best_at_cost(strong_only["cost"], strong_only["accuracy"], budget),
            "cheap_only": best_at_cost(cheap_only["cost"], cheap_only["accuracy"], budget),
            "bands": best_at_cost([p["cost"] for p in frontier], [p["accuracy"] for p in frontier], budget),
            "escalate": best_at_cost(escalate["cost"], escalate["accuracy"], budget),
        }
    return {"strong_only": strong_only, "cheap_only": cheap_only, "bands_frontier": frontier, "escalate": escalate,
            "strong_all_cost_usd": full, "at_budget": at_budget}


def x_side_probability(verdict, swapped: bool) -> float | None:
    """P(x better) from one verdict: the judge's ``prob_a`` where it gives one (``1 − prob_a`` when x was shown
    second), else its label (1, 0.5 for a tie, 0); ``None`` for a failed call."""
    if verdict.preference is None:
        return None
    p_a = verdict.prob_a if verdict.prob_a is not None else {Preference.A: 1.0, Preference.B: 0.0}.get(
        verdict.preference, 0.5)
    return 1.0 - p_a if swapped else p_a


def bidirectional_entropy(judgement) -> float:
    """Entropy (bits) of the judge's preference averaged over both display orders (SCOPE, arXiv 2602.13110):
    ``H((p(x≻y | x first) + p(x≻y | x second)) / 2)``. 0: both orders sure and agreeing; 1: a coin (orders that
    contradict each other, a tie, or a failed call). ``judgement.verdicts`` in the order ``judge_pairs`` makes
    them with ``order="both"`` (x first, then x second); with one order it is that order's entropy."""
    probs = [p for p in (x_side_probability(v, i == 1) for i, v in enumerate(judgement.verdicts)) if p is not None]
    if not probs:
        return 1.0
    p = min(max(sum(probs) / len(probs), 1e-12), 1 - 1e-12)
    return float(-(p * torch.log2(torch.tensor(p)) + (1 - p) * torch.log2(torch.tensor(1 - p))))
