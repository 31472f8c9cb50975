"""The K×K pairwise score matrix of a group of K responses, and rewards from it."""

from __future__ import annotations

import torch


def ordered_pairs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All K(K−1) ordered pairs ``(i, j)``, ``i ≠ j``, row-major. Returns two (K(K−1),) long tensors."""
    i, j = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    keep = i != j
    return i[keep], j[keep]


def upper_pairs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K(K−1)/2 unordered pairs ``i < j``. Returns two long tensors."""
    return torch.triu_indices(k, k, offset=1).unbind(0)


def score_matrix(p: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Antisymmetric scores and symmetric uncertainties from ordered-pair PM outputs.

    Args:
        p: (B, K, K) calibrated logits, ``p[b, i, j] = p(y_i, y_j)`` (diagonal ignored).
        u: (B, K, K) uncertainties ``u(y_i, y_j)``.

    Returns:
        ``S = (p − pᵀ)/2`` (antisymmetric, zero diagonal) and ``U = (u + uᵀ)/2`` (symmetric, zero diagonal).
    """
    eye = torch.eye(p.shape[-1], dtype=torch.bool, device=p.device)
    s = 0.5 * (p - p.transpose(-1, -2))
    uu = 0.5 * (u + u.transpose(-1, -2))
    return s.masked_fill(eye, 0.0), uu.masked_fill(eye, 0.0)


def pairwise_rewards(s: torch.Tensor) -> torch.Tensor:
    """``r_i = (1/(K−1)) Σ_{j≠i} S_ij``. (B, K, K) -> (B, K)."""
    k = s.shape[-1]
    eye = torch.eye(k, dtype=torch.bool, device=s.device)
    return s.masked_fill(eye, 0.0).sum(-1) / (k - 1)


def verdict_logits(scores: torch.Tensor, c: float) -> torch.Tensor:
    """A judge's credit for ``x`` over ``y`` (1, 0.5, 0) as a logit on the PM's scale: ``+c``, ``0``, ``−c``."""
    return (2.0 * scores - 1.0) * c
