"""A linear layer whose spectral norm is bounded: ``‖W‖₂ ≤ c`` (SNGP, Liu et al. 2020).

Bounding the largest singular value keeps the map from stretching distances, so features of inputs far from
the training data stay far away, which is what lets the GP layer see them as unfamiliar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def power_iteration(weight: torch.Tensor, u: torch.Tensor, n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Refines the leading left/right singular vectors of ``weight`` (no gradient).

    Args:
        weight: (O, I).
        u: (O,) current left singular vector estimate.
        n_iter: Number of iterations.

    Returns:
        ``(u, v)`` of shapes (O,) and (I,), unit norm.
    """
    with torch.no_grad():
        v = F.normalize(weight.t() @ u, dim=0)
        for _ in range(max(n_iter, 1)):
            v = F.normalize(weight.t() @ u, dim=0)
            u = F.normalize(weight @ v, dim=0)
    return u, v


def bounded_weight(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bound: float) -> torch.Tensor:
    """``W · min(1, c / σ̂)`` with ``σ̂ = uᵀ W v`` (differentiable in ``W``)."""
    sigma = torch.dot(u, weight @ v)
    return weight / torch.clamp(sigma / bound, min=1.0)


class SpectralNormLinear(nn.Module):
    """``y = W̃ x + b`` with ``W̃ = W · min(1, c/σ̂(W))``; σ̂ is tracked by power iteration while training.

    Args:
        in_features: Input size.
        out_features: Output size.
        bound: The spectral norm bound ``c``.
        n_power_iterations: Power iterations per training forward pass.
        bias: Whether to add a bias.
    """

    def __init__(self, in_features: int, out_features: int, bound: float = 0.95, n_power_iterations: int = 1,
                 bias: bool = True):
        super().__init__()
        self.bound = bound
        self.n_power_iterations = n_power_iterations
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.orthogonal_(self.weight)
        self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0))
        self.register_buffer("v", torch.zeros(in_features))
        self.refresh(50)  # converge once at construction so the bound holds from the first step

    def train(self, mode: bool = True):
        if not mode and self.training:
            # the estimate trails the weight by one optimiser step; converge it before the layer is used frozen
            self.refresh(20)
        return super().train(mode)

    def refresh(self, n_iter: int) -> None:
        """Re-estimates the leading singular vectors with ``n_iter`` power iterations."""
        u, v = power_iteration(self.weight, self.u, n_iter)
        self.u.copy_(u)
        self.v.copy_(v)

    def effective_weight(self) -> torch.Tensor:
        return bounded_weight(self.weight, self.u, self.v, self.bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.refresh(self.n_power_iterations)
        return F.linear(x, self.effective_weight(), self.bias)
