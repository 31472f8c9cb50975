"""Last-layer Laplace on a linear head: a full-covariance Gaussian posterior over ``(w, b)`` of ``g = wᵀh + b``.

The posterior precision is the generalised Gauss–Newton of the Bradley–Terry likelihood plus a prior:
``P = δI + Σ_i p_i(1−p_i) ψ_i ψ_iᵀ`` with ``ψ = [norm(h), 1]``; the logit's variance is ``σ² = ψᵀP⁻¹ψ`` and
the probit (mean-field) approximation gives ``u = sqrt(1 + λσ²)``, ``p = g/u`` (λ = π/8). The prior precision δ
is chosen after training, with the weights fixed, by the Laplace evidence (MacKay) or on validation pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lit_route.uncertainty.posterior import PrecisionHead

PRIOR_GRID = tuple(10.0 ** (k / 4) for k in range(-16, 25))  # 1e-4 .. 1e6, four points per decade


def log_evidence(eigenvalues: torch.Tensor, weight_sq_norm: float, prior: torch.Tensor) -> torch.Tensor:
    """The δ-dependent part of the Laplace log marginal likelihood at a fixed mode ``w*``.

    ``log p(D|δ) ≈ log p(D|w*) − ½δ‖w*‖² + ½P log δ − ½ Σ_i log(λ_i + δ)``, where ``λ_i`` are the eigenvalues of
    the data term of the precision; ``log p(D|w*)`` does not depend on δ and is left out.

    Args:
        eigenvalues: (P,) eigenvalues of ``Σ w ψψᵀ`` (≥ 0).
        weight_sq_norm: ``‖w*‖²``.
        prior: (K,) candidate prior precisions δ.

    Returns:
        (K,) log evidence up to a constant.
    """
    lam = eigenvalues.double().clamp_min(0.0)
    prior = prior.double()
    p = lam.numel()
    log_det = torch.log(lam.unsqueeze(0) + prior.unsqueeze(1)).sum(1)
    return -0.5 * prior * weight_sq_norm + 0.5 * p * torch.log(prior) - 0.5 * log_det


def probit_nll(logits: torch.Tensor, variance: torch.Tensor, labels: torch.Tensor, factor: float) -> torch.Tensor:
    """Mean negative log-likelihood of ``labels`` under ``σ(g / sqrt(1 + λσ²))``. Shapes (N,) -> scalar."""
    p = logits.double() / torch.sqrt(1.0 + factor * variance.double())
    return F.binary_cross_entropy_with_logits(p, labels.double())


class LaplaceHead(PrecisionHead):
    """Linear head with a last-layer Laplace posterior (full covariance over the H + 1 weights).

    Trained like the linear head; the covariance pass then accumulates the GGN over the training pairs and
    ``finalize`` picks the prior precision. Extra cost per pair over the linear head: one (H+1)×(H+1) quadratic
    form per sequence (≈ 0.3 M multiply-adds at H = 576), nothing next to a backbone forward.

    Args:
        in_features: Pooled hidden size H.
        normalize_input: LayerNorm (no affine) on ``h`` first, as the SNGP head does; it keeps a few huge
            hidden dimensions from dominating both the fit and the posterior.
        prior_precision: δ; ``marglik`` chooses it by the Laplace evidence, ``validation`` by the
            probit NLL on validation pairs (given to :meth:`select_prior_on`; marglik is used when none come).
        mean_field_factor: λ in ``u = sqrt(1 + λσ²)`` (π/8: the probit approximation).
    """

    def __init__(
        self,
        in_features: int,
        normalize_input: bool = True,
        prior_precision: float | str = "marglik",
        mean_field_factor: float = math.pi / 8,
    ):
        super().__init__(in_features + 1, "logistic", mean_field_factor)
        if isinstance(prior_precision, str) and prior_precision not in ("marglik", "validation"):
            raise ValueError(f"laplace.prior_precision: expected a number, 'marglik' or 'validation', got {prior_precision!r}")
        if not isinstance(prior_precision, str) and not prior_precision > 0:
            raise ValueError(f"laplace.prior_precision: must be > 0, got {prior_precision}")
        self.normalize_input = normalize_input
        self.prior_mode = prior_precision
        self.linear = nn.Linear(in_features, 1)
        self.register_buffer("chosen_prior", torch.tensor(
            float(prior_precision) if not isinstance(prior_precision, str) else 1.0, dtype=torch.float64))
        self._validation: tuple[torch.Tensor, torch.Tensor] | None = None

    def posterior_features(self, h: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, H+1) ``ψ = [norm(h), 1]`` in float32."""
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            if self.normalize_input:
                h = F.layer_norm(h, h.shape[-1:])
            return torch.cat([h, torch.ones_like(h[:, :1])], dim=1)

    def _mode(self) -> torch.Tensor:
        return torch.cat([self.linear.weight.reshape(-1), self.linear.bias.reshape(-1)]).double()

    def logits_from(self, phi: torch.Tensor) -> torch.Tensor:
        return F.linear(phi[:, :-1], self.linear.weight, self.linear.bias).squeeze(-1)

    def prior_precision(self) -> float:
        return float(self.chosen_prior)

    @torch.no_grad()
    def select_prior_on(self, h: torch.Tensor, labels: torch.Tensor) -> None:
        """Validation features (N, H) and labels (N,) for ``prior_precision: validation`` (used by ``finalize``)."""
        self._validation = (h.detach().float(), labels.detach().float())

    @torch.no_grad()
    def finalize(self) -> None:
        self._all_reduce()
        if isinstance(self.prior_mode, str):
            self.chosen_prior.fill_(self._select_prior())
        self._factorize()
        self._validation = None

    def _select_prior(self) -> float:
        grid = torch.tensor(PRIOR_GRID, dtype=torch.float64, device=self.precision.device)
        data = 0.5 * (self.precision + self.precision.t())
        if self.prior_mode == "validation" and self._validation is not None:
            h, labels = self._validation
            phi = self.posterior_features(h.to(self.precision.device)).double()
            g = self.logits_from(phi.float()).double()
            eigvals, eigvecs = torch.linalg.eigh(data)
            proj = (phi @ eigvecs) ** 2  # σ²(δ) = Σ_i (ψᵀv_i)² / (λ_i + δ)
            losses = torch.stack([probit_nll(g, (proj / (eigvals.clamp_min(0) + d)).sum(1), labels.to(g.device),
                                             self.mean_field_factor) for d in grid])
            return float(grid[int(torch.argmin(losses))])
        eigvals = torch.linalg.eigvalsh(data)
        evidence = log_evidence(eigvals, float(self._mode().pow(2).sum()), grid)
        return float(grid[int(torch.argmax(evidence))])
