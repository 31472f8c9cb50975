"""Pure-torch uncertainty components: spectral normalisation, random features, the GP head and its math."""

from lit_route.uncertainty.gp import (
    factorize_precision,
    gp_weights,
    mean_field,
    precision_increment,
    predictive_variance,
)
from lit_route.uncertainty.heads import HEADS, LinearHead, PreferenceHead, SNGPHead, build_head
from lit_route.uncertainty.random_features import RandomFourierFeatures
from lit_route.uncertainty.spectral import SpectralNormLinear

__all__ = [
    "HEADS",
    "LinearHead",
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
