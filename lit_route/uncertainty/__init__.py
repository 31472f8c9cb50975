"""Pure-torch uncertainty components: spectral normalisation, random features, GP math, and the heads (linear,
margin, SNGP, last-layer Laplace, MC dropout, deep ensemble) behind one protocol."""

from lit_route.uncertainty.ensemble import EnsembleHead
from lit_route.uncertainty.gp import (
    factorize_precision,
    gp_weights,
    mean_field,
    precision_increment,
    predictive_variance,
)
from lit_route.uncertainty.heads import HeadBase, LinearHead, MarginHead, PreferenceHead
from lit_route.uncertainty.laplace import LaplaceHead
from lit_route.uncertainty.mc_dropout import MCDropoutHead
from lit_route.uncertainty.posterior import PrecisionHead
from lit_route.uncertainty.random_features import RandomFourierFeatures
from lit_route.uncertainty.registry import HEADS, build_head
from lit_route.uncertainty.sngp import SNGPHead
from lit_route.uncertainty.spectral import SpectralNormLinear

__all__ = [
    "HEADS",
    "EnsembleHead",
    "HeadBase",
    "LaplaceHead",
    "LinearHead",
    "MCDropoutHead",
    "MarginHead",
    "PrecisionHead",
    "PreferenceHead",
    "RandomFourierFeatures",
    "SNGPHead",
    "SpectralNormLinear",
    "build_head",
    "factorize_precision",
    "gp_weights",
    "mean_field",
    "precision_increment",
    "predictive_variance",
]
