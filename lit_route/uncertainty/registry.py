"""Building a head by name, as the YAML configs select it (``model.head: sngp``)."""

from __future__ import annotations

from torch import nn

from lit_route.uncertainty.ensemble import EnsembleHead
from lit_route.uncertainty.heads import LinearHead, MarginHead
from lit_route.uncertainty.laplace import LaplaceHead
from lit_route.uncertainty.mc_dropout import MCDropoutHead
from lit_route.uncertainty.sngp import SNGPHead

HEADS: dict[str, type[nn.Module]] = {
    "linear": LinearHead,
    "margin": MarginHead,
    "sngp": SNGPHead,
    "laplace": LaplaceHead,
    "mc_dropout": MCDropoutHead,
    "ensemble": EnsembleHead,
}


def build_head(kind: str, in_features: int, **kwargs) -> nn.Module:
    """Builds a head by name; ``kwargs`` are that head's options (none for ``linear`` and ``margin``)."""
    if kind not in HEADS:
        raise ValueError(f"head: expected one of {sorted(HEADS)}, got {kind!r}")
    return HEADS[kind](in_features, **kwargs)
