"""Random Fourier features approximating an RBF kernel (Rahimi & Recht 2007)."""

from __future__ import annotations

import math

import torch
from torch import nn


def random_fourier_features(h: torch.Tensor, weight: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """``φ(h) = sqrt(2/D) · cos(W h + b)``, so that ``φ(x)ᵀφ(y) ≈ exp(-‖x−y‖² / 2ℓ²)``.

    Args:
        h: (N, I) inputs.
        weight: (D, I) frequencies drawn from N(0, 1/ℓ²).
        phase: (D,) phases drawn from U[0, 2π).

    Returns:
        (N, D) features.
    """
    d = weight.shape[0]
    return math.sqrt(2.0 / d) * torch.cos(h @ weight.t() + phase)


class RandomFourierFeatures(nn.Module):
    """Fixed (untrained) random features; the draws and ℓ are buffers, so they travel with the checkpoint.

    Args:
        in_features: Input size I.
        num_features: Number of random features D.
        length_scale: RBF length-scale ℓ (it can be set later, e.g. by the median heuristic).
        seed: Seed of the draws (independent of the global RNG).
    """

    def __init__(self, in_features: int, num_features: int = 1024, length_scale: float = 1.0, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("unit_weight", torch.randn(num_features, in_features, generator=gen))
        self.register_buffer("phase", torch.rand(num_features, generator=gen) * 2 * math.pi)
        self.register_buffer("length_scale", torch.tensor(float(length_scale)))

    @property
    def weight(self) -> torch.Tensor:
        """(D, I) frequencies W ~ N(0, 1/ℓ²)."""
        return self.unit_weight / self.length_scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return random_fourier_features(h, self.weight, self.phase)
