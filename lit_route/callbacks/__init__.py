"""Lightning callbacks: covariance finalisation, uncertainty routing of rewards."""

from lit_route.callbacks.finalize import FinalizeCovariance

__all__ = ["FinalizeCovariance"]
