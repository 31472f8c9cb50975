"""Heads with a Gaussian posterior over their last linear layer, built by one explicit pass after training.

SNGP (over random Fourier features) and last-layer Laplace (over the pooled feature itself) share this state:
``reset_precision`` → ``accumulate`` over the training pairs → ``finalize`` (sums across ranks, adds the prior
precision, factorises once in float64) → ``predict`` gives ``p = g/u``, ``u = sqrt(1 + λσ²)``. Asking for a
variance before ``finalize`` raises.
"""

from __future__ import annotations

import math

import torch

from lit_route.uncertainty.gp import (
    covariance_from_cholesky,
    factorize_precision,
    gp_weights,
    mean_field,
    precision_increment,
    predictive_variance,
)
from lit_route.uncertainty.heads import HeadBase


class PrecisionHead(HeadBase):
    """Shared explicit precision state of a last-layer Gaussian posterior with ``D`` posterior features.

    Subclasses define ``posterior_features(h) -> (N, D)`` (what the last layer is linear in),
    ``logits_from(phi) -> (N,)`` and ``prior_precision() -> float``.

    Args:
        num_features: D.
        weighting: ``gaussian`` (w = 1) or ``logistic`` (w = p(1−p), the Laplace/GGN weights).
        mean_field_factor: λ in ``u = sqrt(1 + λσ²)``.
    """

    has_uncertainty = True
    needs_covariance_pass = True

    def __init__(self, num_features: int, weighting: str, mean_field_factor: float = math.pi / 8):
        super().__init__()
        gp_weights(torch.zeros(1), weighting)  # validate early
        self.weighting = weighting
        self.mean_field_factor = mean_field_factor
        d = num_features
        self.register_buffer("precision", torch.zeros(d, d, dtype=torch.float64))
        self.register_buffer("covariance", torch.zeros(d, d, dtype=torch.float64))
        self.register_buffer("n_accumulated", torch.zeros((), dtype=torch.float64))
        self.register_buffer("jitter", torch.zeros((), dtype=torch.float64))
        self.register_buffer("finalized", torch.zeros((), dtype=torch.bool))

    # --- what subclasses define ---------------------------------------------------------------------------
    def posterior_features(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits_from(self, phi: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prior_precision(self) -> float:
        raise NotImplementedError

    def variance_scale(self) -> float:
        """Factor applied to ``φᵀP⁻¹φ`` (1 unless a head reproduces another convention)."""
        return 1.0

    # --- the explicit precision state ----------------------------------------------------------------------
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        phi = self.posterior_features(h)
        with torch.autocast(h.device.type, enabled=False):
            return self.logits_from(phi)

    @property
    def ready(self) -> bool:
        return bool(self.finalized)

    def reset_precision(self) -> None:
        self.precision.zero_()
        self.covariance.zero_()
        self.n_accumulated.zero_()
        self.jitter.zero_()
        self.finalized.fill_(False)

    @torch.no_grad()
    def accumulate(self, h: torch.Tensor) -> None:
        """Adds ``Σ w φφᵀ`` of a batch of training features (N, H) to this rank's precision sum."""
        phi = self.posterior_features(h)
        logits = self.logits_from(phi)
        self.precision += precision_increment(phi, gp_weights(logits, self.weighting))
        self.n_accumulated += phi.shape[0]

    def _all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.precision)
            torch.distributed.all_reduce(self.n_accumulated)

    @torch.no_grad()
    def finalize(self) -> None:
        """Sums the precision across ranks, adds the prior precision, factorises once and caches ``P⁻¹``."""
        self._all_reduce()
        self._factorize()

    def _factorize(self) -> None:
        """Adds the prior precision to the accumulated data term (``precision`` then holds the posterior
        precision) and factorises it."""
        eye = torch.eye(self.precision.shape[0], dtype=torch.float64, device=self.precision.device)
        self.precision += self.prior_precision() * eye
        chol, jitter = factorize_precision(self.precision)
        self.covariance.copy_(covariance_from_cholesky(chol))
        self.jitter.fill_(jitter)
        self.finalized.fill_(True)

    def _require_finalized(self) -> None:
        if not bool(self.finalized):
            raise RuntimeError(
                f"{type(self).__name__} is not finalised: run the FinalizeCovariance pass before asking for variances"
            )

    def variance(self, h: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N,) float64 predictive variance of the logit; requires :meth:`finalize`."""
        self._require_finalized()
        return predictive_variance(self.posterior_features(h), self.covariance) * self.variance_scale()

    def predict(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_finalized()
        phi = self.posterior_features(h)
        with torch.autocast(h.device.type, enabled=False):
            g = self.logits_from(phi)
        variance = predictive_variance(phi, self.covariance) * self.variance_scale()
        return mean_field(g, variance, self.mean_field_factor)
