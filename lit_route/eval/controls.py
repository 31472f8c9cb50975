"""The length-only router: the control every routing table reports beside random and oracle routing.

A router that reads nothing but the two responses' lengths needs no PM and no uncertainty model. Where a PM's
errors concentrate on long (or short, or similar-length) pairs, it finds them too, and a PM router earns its
place only by finding errors *beyond* what length finds: the paired difference against this control.

``by`` says how a pair's priority is read from the lengths ``|a|``, ``|b|`` (characters), higher judged first:

- ``sum``: ``|a| + |b|`` (the longest pairs first);
- ``max``: ``max(|a|, |b|)`` (the pairs with the longest response first);
- ``closest``: ``−||a| − |b||`` (the pairs whose responses are closest in length first; the default);
- ``farthest``: ``||a| − |b||``.

The default is the stronger control on the constraints task's validation prompts with the PM of
``configs/pm/constraints_mean12.yaml`` (``benchmarks/routing_vs_length.py``): ``closest`` recovered 23.4% of the
(oracle − random) area there, ``sum`` 20.5%, ``max`` −5.9%, ``farthest`` −37.2%. Another task's PM errs elsewhere:
``length_by`` picks the variant. Ties are broken at random in expectation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LENGTH_BY = ("sum", "max", "closest", "farthest")
DEFAULT_LENGTH_BY = "closest"


def response_lengths(pairs: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Characters of each pair's ``chosen`` and ``rejected`` responses: two (N,) float64 tensors."""
    return (torch.tensor([float(len(p.chosen)) for p in pairs], dtype=torch.float64),
            torch.tensor([float(len(p.rejected)) for p in pairs], dtype=torch.float64))


def length_priority(len_a: torch.Tensor, len_b: torch.Tensor, by: str = DEFAULT_LENGTH_BY) -> torch.Tensor:
    """The length-only router's priority (N,) float64 (higher judged first); symmetric in the two responses.

    Args:
        len_a, len_b: (N,) response lengths.
        by: One of :data:`LENGTH_BY` (see the module docstring).
    """
    a, b = len_a.double(), len_b.double()
    if by == "sum":
        return a + b
    if by == "max":
        return torch.maximum(a, b)
    if by == "closest":
        return -(a - b).abs()
    if by == "farthest":
        return (a - b).abs()
    raise ValueError(f"length_by: expected one of {list(LENGTH_BY)}, got {by!r}")
