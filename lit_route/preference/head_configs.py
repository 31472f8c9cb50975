"""Options of each uncertainty head, as typed dataclasses the YAML configs fill (``model.sngp``, ``model.laplace``,
``model.mc_dropout``, ``model.ensemble``)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SNGPConfig:
    """Options of the SNGP head (see :class:`lit_route.uncertainty.SNGPHead`).

    Args:
        num_features: Random features D.
        proj_dim: Size of the spectral-normalised projection (default: hidden size; 0 disables it).
        spectral_bound: Spectral norm bound c of the projection.
        normalize_input: LayerNorm before the projection.
        length_scale: RBF length-scale ℓ; ``None`` (default) sets it before training by the median heuristic
            (median distance between the projected features of different training pairs).
        ridge: Prior precision s.
        weighting: ``gaussian`` (paper's code) or ``logistic`` (SNGP paper).
        mean_field_factor: λ in u = sqrt(1 + λσ²); π/8 by default. The paper's checkpoint used 10 with σ²
            scaled by the ridge (``ridge_scaled_variance``); without that scaling, λ·s is the same setting.
        ridge_scaled_variance: σ² = s·φᵀP⁻¹φ, the convention of edward2 and the paper's code.
        seed: Seed of the random features.
    """

    num_features: int = 1024
    proj_dim: int | None = None
    spectral_bound: float = 0.95
    normalize_input: bool = True
    length_scale: float | None = None
    ridge: float = 1.0
    weighting: str = "gaussian"
    mean_field_factor: float = math.pi / 8
    ridge_scaled_variance: bool = False
    seed: int = 0


@dataclass
class LaplaceConfig:
    """Options of the last-layer Laplace head (see :class:`lit_route.uncertainty.LaplaceHead`).

    Args:
        normalize_input: LayerNorm (no affine) on the pooled feature.
        prior_precision: A number, ``marglik`` (Laplace evidence) or ``validation`` (probit NLL on the
            validation pairs).
        mean_field_factor: λ in u = sqrt(1 + λσ²) (π/8: the probit approximation).
    """

    normalize_input: bool = True
    prior_precision: float | str = "marglik"
    mean_field_factor: float = math.pi / 8


@dataclass
class MCDropoutConfig:
    """Options of the MC dropout head (see :class:`lit_route.uncertainty.MCDropoutHead`).

    Args:
        hidden: Hidden width of the MLP.
        dropout: Drop probability.
        passes: Dropout masks sampled at prediction time.
        normalize_input: LayerNorm (no affine) on the pooled feature.
        mean_field_factor: λ in u = sqrt(1 + λσ²).
        seed: Seed of the prediction-time masks.
    """

    hidden: int = 256
    dropout: float = 0.2
    passes: int = 32
    normalize_input: bool = True
    mean_field_factor: float = math.pi / 8
    seed: int = 0


@dataclass
class EnsembleConfig:
    """Options of the deep ensemble of heads (see :class:`lit_route.uncertainty.EnsembleHead`).

    Args:
        members: Number of members M.
        hidden: Hidden width of each member (0: linear members).
        bootstrap: Online bagging (Poisson(1) weight per member and pair).
        normalize_input: LayerNorm (no affine) on the pooled feature.
        mean_field_factor: λ in u = sqrt(1 + λσ²).
        seed: Seed of the members' initialisation.
    """

    members: int = 5
    hidden: int = 256
    bootstrap: bool = True
    normalize_input: bool = True
    mean_field_factor: float = math.pi / 8
    seed: int = 0
