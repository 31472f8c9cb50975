"""A linear layer whose spectral norm is bounded: ``‖W‖₂ ≤ c`` (SNGP, Liu et al. 2020).

Bounding the largest singular value keeps the map from stretching distances, so features of inputs far from
the training data stay far away, which is what lets the GP layer see them as unfamiliar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def power_iteration(
    weight: torch.Tensor, u: torch.Tensor, n_iter: int, tol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refines the leading left/right singular vectors of ``weight`` (no gradient).

    Args:
        weight: (O, I).
        u: (O,) current left singular vector estimate.
        n_iter: Maximum number of iterations (at least one is run).
        tol: Stop early once the estimate ``σ̂ = ‖W v‖`` changes by less than ``tol · σ̂`` in one iteration.

    Returns:
        ``(u, v)`` of shapes (O,) and (I,), unit norm.
    """
    with torch.no_grad():
        sigma = None
        for _ in range(max(n_iter, 1)):
            v = F.normalize(weight.t() @ u, dim=0)
            wv = weight @ v
            u = F.normalize(wv, dim=0)
            new = wv.norm()
            if sigma is not None and (new - sigma).abs() <= tol * new:
                break
            sigma = new
    return u, v


def bounded_weight(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bound: float) -> torch.Tensor:
    """``W · min(1, c / σ̂)`` with ``σ̂ = uᵀ W v`` (differentiable in ``W``)."""
    sigma = torch.dot(u, weight @ v)
    return weight / torch.clamp(sigma / bound, min=1.0)


class SpectralNormLinear(nn.Module):
    """``y = W̃ x + b`` with ``W̃ = W · min(1, c/σ(W))``.

    While training, the leading singular vectors are tracked by warm-started power iteration (they give the
    gradient its direction). Power iteration approaches σ from below, and slowly when the top singular values
    cluster (an orthogonal init starts with all of them equal): with 100 iterations it left ``‖W̃‖₂`` up to 2%
    above ``c``. So where it is cheap (the smaller side of ``W`` at most ``exact_max_features``: an eigenvalue
    problem of that size per training forward, ~0.1 s at 576 on one CPU core, well under the backbone's step)
    the value of σ is exact (the largest eigenvalue of ``WWᵀ`` or ``WᵀW``) and ``‖W̃‖₂ ≤ c`` holds in every
    training forward up to float rounding. Larger layers keep the power-iteration estimate: the bound then holds
    within ~2% while training. In eval mode σ is always exact (kept in the ``sigma`` buffer).

    Args:
        in_features: Input size.
        out_features: Output size.
        bound: The spectral norm bound ``c``.
        n_power_iterations: Most power iterations per training forward pass.
        tol: Relative change of σ̂ below which the iterations stop.
        bias: Whether to add a bias.
        exact_max_features: Exact σ in training forwards when ``min(in_features, out_features)`` is at most this.
    """

    def __init__(self, in_features: int, out_features: int, bound: float = 0.95, n_power_iterations: int = 100,
                 tol: float = 1e-6, bias: bool = True, exact_max_features: int = 1024):
        super().__init__()
        self.bound = bound
        self.exact = min(in_features, out_features) <= exact_max_features
        self.n_power_iterations = n_power_iterations
        self.tol = tol
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.orthogonal_(self.weight)
        self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0))
        self.register_buffer("v", torch.zeros(in_features))
        self.register_buffer("sigma", torch.zeros(()))
        self.refresh(50)  # converge once at construction so the bound holds from the first step
        self.refresh_exact()

    def train(self, mode: bool = True):
        if not mode and self.training:
            # power iteration approaches σ from below; the frozen layer is bounded by the exact σ
            self.refresh_exact()
        return super().train(mode)

    def refresh(self, n_iter: int) -> None:
        """Re-estimates the leading singular vectors with at most ``n_iter`` power iterations."""
        u, v = power_iteration(self.weight, self.u, n_iter, self.tol)
        self.u.copy_(u)
        self.v.copy_(v)

    @torch.no_grad()
    def refresh_exact(self) -> None:
        """Stores the exact σ(W) in the ``sigma`` buffer: the square root of the largest eigenvalue of the smaller
        Gram matrix (``WWᵀ`` or ``WᵀW``; a symmetric eigenvalue problem, cheaper than an SVD). Only σ is taken:
        the singular vectors are not unique when the top singular values coincide, and the power-iteration
        vectors stay as they are."""
        self.sigma.fill_(float(spectral_norm(self.weight)))

    def effective_weight(self) -> torch.Tensor:
        if not self.training and float(self.sigma) > 0:
            return self.weight / torch.clamp(self.sigma / self.bound, min=1.0)
        if not (self.exact and float(self.sigma) > 0):
            return bounded_weight(self.weight, self.u, self.v, self.bound)
        # the exact σ's value with the power iteration's gradient direction: σ̂ = uᵀWv rescaled (no gradient
        # through the rescaling) to σ
        sigma_hat = torch.dot(self.u, self.weight @ self.v)
        sigma = sigma_hat * (self.sigma / sigma_hat.detach().clamp_min(1e-12))
        return self.weight / torch.clamp(sigma / self.bound, min=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.refresh(self.n_power_iterations)
            if self.exact:
                self.refresh_exact()
        return F.linear(x, self.effective_weight(), self.bias)


@torch.no_grad()
def spectral_norm(weight: torch.Tensor) -> torch.Tensor:
    """σ(W) of ``weight`` (O, I) -> scalar, in float32: ``sqrt(λ_max)`` of the smaller Gram matrix."""
    w = weight.detach().float()
    gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt()
