"""Lightning callbacks: covariance finalisation, uncertainty routing of rewards."""

from lit_route.callbacks.finalize import FinalizeCovariance
from lit_route.callbacks.routing import UncertaintyRouting

__all__ = ["FinalizeCovariance", "UncertaintyRouting"]
