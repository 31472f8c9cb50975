"""Losses and pair scores of the pairwise preference model (pure functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Logistic (Bradley–Terry) loss on pairwise logits.

    Args:
        logits: (N,) ``g`` = logit of P(first response ≻ second).
        labels: (N,) 1 when the first response is the preferred one, else 0.
        weights: (N,) optional per-example weights (preference strength), already divided by a global normaliser
            (the training set's mean strength). They are not renormalised per batch: with one pair per batch,
            that would make every weight 1, and under gradient accumulation it would change their ratios.

    Returns:
        Scalar loss: ``mean_i(w_i · ℓ_i)``.
    """
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    if weights is None:
        return loss.mean()
    return (loss * weights.float()).mean()


def antisymmetric_score(p_ab: torch.Tensor, p_ba: torch.Tensor) -> torch.Tensor:
    """``d(a, b) = (p(a,b) − p(b,a)) / 2``: exactly antisymmetric, ``d(a,b) = −d(b,a)``. Shapes (N,) -> (N,)."""
    return 0.5 * (p_ab - p_ba)


def mean_uncertainty(u_ab: torch.Tensor, u_ba: torch.Tensor) -> torch.Tensor:
    """``ū = (u(a,b) + u(b,a)) / 2``: symmetric in the order. Shapes (N,) -> (N,)."""
    return 0.5 * (u_ab + u_ba)
