"""A judge cascade: the PM answers the certain pairs, a cheap judge a middle band, a strong judge the top band.

Pure band assignment, shared by the routing callback (online) and the cascade curves of evaluation (offline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lit_route.judges.base import JudgeBackend
from lit_route.routing.routers import count_for_fraction


@dataclass
class CascadeStage:
    """A cheaper judge for the band of pairs just below the main judge's (the routing callback's and
    ``lit-route serve``'s ``cascade`` items).

    Args:
        judge: The judge backend (its own policy and prices).
        fraction: Share of each step's pairs in its band.
        cache: Its sqlite verdict cache (``None``: none).
    """

    judge: JudgeBackend
    fraction: float
    cache: str | None = None


def cascade_bands(priority: torch.Tensor, shares: Sequence[float]) -> torch.Tensor:
    """Which judge answers each pair: bands of ``priority`` from the top, one per judge.

    Args:
        priority: (N,) routing priority (ū for uncertainty routing), highest first.
        shares: Share of the N pairs for each judge, strongest judge first (its band is the top one).

    Returns:
        (N,) long: the index of the judge in ``shares`` that answers the pair, or −1 for the PM. Band ``i`` holds
        exactly ``count_for_fraction(N, sum(shares[:i+1])) − count_for_fraction(N, sum(shares[:i]))`` pairs.
    """
    n = priority.numel()
    if sum(shares) > 1 + 1e-9:
        raise ValueError(f"cascade: the judges' shares add up to {sum(shares):.3f} > 1")
    order = torch.argsort(priority.double().flatten(), descending=True, stable=True)
    out = torch.full((n,), -1, dtype=torch.long)
    start, cumulative = 0, 0.0
    for index, share in enumerate(shares):
        cumulative += share
        stop = count_for_fraction(n, min(cumulative, 1.0))
        out[order[start:stop]] = index
        start = stop
    return out.view(priority.shape)
