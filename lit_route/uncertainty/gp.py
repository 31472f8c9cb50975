"""Laplace-approximated GP output layer: precision, its factorisation, predictive variance, mean-field logits.

All accumulation and factorisation is in float64: the precision is a sum over the whole training set, and in
float32 (let alone bf16) its small eigenvalues, which are exactly the ones that carry the uncertainty, are lost.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def gp_weights(logits: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-example weights of the precision update.

    Args:
        logits: (N,) logits of the examples.
        weighting: ``gaussian`` (w = 1, as in the paper's code) or ``logistic`` (w = p(1−p), the SNGP paper's
            Laplace approximation for a Bernoulli likelihood).

    Returns:
        (N,) float64 weights.
    """
    if weighting == "gaussian":
        return torch.ones_like(logits, dtype=torch.float64)
    if weighting == "logistic":
        p = torch.sigmoid(logits.double())
        return p * (1 - p)
    raise ValueError(f"weighting: expected 'gaussian' or 'logistic', got {weighting!r}")


def precision_increment(phi: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i φ_i φ_iᵀ`` in float64.

    Args:
        phi: (N, D) random features.
        weights: (N,).

    Returns:
        (D, D).
    """
    phi = phi.double()
    return (phi * weights.double().unsqueeze(1)).t() @ phi


def factorize_precision(precision: torch.Tensor, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Cholesky factor of a symmetric positive-definite precision, with a reported jitter fallback.

    If the factorisation fails (rounding made the matrix indefinite), ``jitter · mean(diag)`` is added to the
    diagonal, starting at 1e-10 and growing tenfold per try. The jitter used is returned so that callers can log
    and store it; failing after ``max_tries`` raises instead of returning garbage.

    Args:
        precision: (D, D) float64.
        max_tries: Number of jitter levels to try.

    Returns:
        ``(L, jitter)`` with ``L Lᵀ = precision + jitter·mean(diag)·I``.

    Raises:
        torch.linalg.LinAlgError: the matrix is not positive definite even with the largest jitter.
    """
    precision = 0.5 * (precision + precision.t())  # accumulated sums are symmetric only up to rounding
    chol, info = torch.linalg.cholesky_ex(precision)
    if int(info) == 0:
        return chol, 0.0
    scale = precision.diagonal().mean().abs().item() or 1.0
    eye = torch.eye(precision.shape[0], dtype=precision.dtype, device=precision.device)
    for k in range(max_tries):
        jitter = 10.0 ** (-10 + k)
        chol, info = torch.linalg.cholesky_ex(precision + jitter * scale * eye)
        if int(info) == 0:
            log.warning("precision was not positive definite; added jitter %.1e x mean diagonal", jitter)
            return chol, jitter
    raise torch.linalg.LinAlgError("precision is not positive definite even with jitter 1e-3; check for NaN features")


def covariance_from_cholesky(chol: torch.Tensor) -> torch.Tensor:
    """``P⁻¹`` from the Cholesky factor ``L`` of ``P`` (computed once, then reused for every variance)."""
    return torch.cholesky_inverse(chol)


def predictive_variance(phi: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """``σ² = φᵀ P⁻¹ φ`` per row.

    Args:
        phi: (N, D).
        covariance: (D, D) float64 ``P⁻¹``.

    Returns:
        (N,) float64 variances (clamped at 0 against rounding).
    """
    phi = phi.to(covariance.dtype)
    return ((phi @ covariance) * phi).sum(dim=1).clamp_min(0.0)


def mean_field(logits: torch.Tensor, variance: torch.Tensor, factor: float = math.pi / 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-field approximation of the posterior predictive: ``u = sqrt(1 + λσ²)``, ``p = g/u``.

    Args:
        logits: (N,) posterior-mean logits ``g``.
        variance: (N,) predictive variances ``σ²``.
        factor: λ (π/8 in SNGP; the paper's released checkpoint used 10).

    Returns:
        ``(p, u)``, both (N,) in the dtype of ``logits``; ``u ≥ 1``.
    """
    u = torch.sqrt(1.0 + factor * variance.double())
    return (logits.double() / u).to(logits.dtype), u.to(logits.dtype)
