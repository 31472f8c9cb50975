"""Routers: which pairs to send to the judge.

Every router maps ``(d, u)`` (scores and uncertainties of N pairs, any shape) to a boolean mask of the same
shape. Budget-style routers pick exactly ``count_for_fraction(N, f)`` pairs, breaking ties by position.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Router(Protocol):
    """Picks the pairs to judge."""

    def route(self, d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``d``, ``u``: scores and uncertainties (same shape) -> boolean mask of that shape."""


def count_for_fraction(n: int, fraction: float) -> int:
    """Number of pairs a budget of ``fraction`` buys: ``round(fraction · n)``, halves rounded up."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: expected a value in [0, 1], got {fraction}")
    return min(n, math.floor(fraction * n + 0.5))


def threshold_for_fraction(u: torch.Tensor, fraction: float) -> float:
    """The threshold τ such that ``u > τ`` selects (about) ``fraction`` of ``u``; calibrates a ThresholdRouter.

    With ties at the boundary the selected fraction can be smaller; the BudgetRouter is exact.
    """
    flat = u.detach().flatten().double()
    k = count_for_fraction(flat.numel(), fraction)
    if k == 0:
        return float(flat.max()) if flat.numel() else math.inf
    if k == flat.numel():
        return float(flat.min()) - 1.0
    top = torch.sort(flat, descending=True).values
    # midway between the k-th largest and the next one
    return float(0.5 * (top[k - 1] + top[k]))


def _top_k_mask(priority: torch.Tensor, k: int) -> torch.Tensor:
    flat = priority.flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(priority.shape)


class ThresholdRouter:
    """Judge every pair with ``ū > τ``.

    Args:
        threshold: τ.
    """

    def __init__(self, threshold: float):
        self.threshold = threshold

    def route(self, d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return u > self.threshold


class BudgetRouter:
    """Judge exactly the ``round(fraction · N)`` most uncertain pairs (top-k by ``ū``).

    Args:
        fraction: Share of the pairs to judge.
    """

    def __init__(self, fraction: float):
        count_for_fraction(1, fraction)
        self.fraction = fraction

    def route(self, d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return _top_k_mask(u.double(), count_for_fraction(u.numel(), self.fraction))


class MarginRouter:
    """Judge the pairs with the smallest ``|d|``: the baseline that needs no uncertainty model.

    Args:
        fraction: Share of the pairs to judge.
    """

    def __init__(self, fraction: float):
        count_for_fraction(1, fraction)
        self.fraction = fraction

    def route(self, d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return _top_k_mask(-d.abs().double(), count_for_fraction(d.numel(), self.fraction))


class RandomRouter:
    """Judge a random subset: ``fraction`` of the pairs, or exactly ``count`` (to match another router).

    Args:
        fraction: Share of the pairs to judge (ignored when ``count`` is given).
        count: Exact number of pairs to judge.
        seed: Seed of the generator; each call draws a fresh subset from it.
    """

    def __init__(self, fraction: float = 0.0, count: int | None = None, seed: int = 0):
        count_for_fraction(1, fraction)
        self.fraction, self.count = fraction, count
        self.generator = torch.Generator().manual_seed(seed)

    def route(self, d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        n = d.numel()
        k = min(self.count, n) if self.count is not None else count_for_fraction(n, self.fraction)
        scores = torch.rand(n, generator=self.generator, dtype=torch.float64)
        return _top_k_mask(scores, k).view(d.shape)


class OracleRouter:
    """Evaluation only: judge the PM's errors first (``d ≤ 0`` when ``d = d(chosen, rejected)``), then the most
    uncertain of the rest. The upper bound any router could reach with a perfect judge.

    Args:
        fraction: Share of the pairs to judge.
    """

    def __init__(self, fraction: float):
        count_for_fraction(1, fraction)
        self.fraction = fraction

    def route(self, d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        errors = (d <= 0).double()
        # errors outrank everything; within each group the more uncertain first (u is squashed into [0, 1))
        priority = 2.0 * errors + torch.sigmoid(u.double()) * 0.999
        return _top_k_mask(priority, count_for_fraction(d.numel(), self.fraction))
