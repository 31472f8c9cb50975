"""Lightning callbacks: covariance finalisation, uncertainty routing of rewards, held-out evaluation by a verifier."""

from lit_route.callbacks.finalize import FinalizeCovariance
from lit_route.callbacks.routing import UncertaintyRouting
from lit_route.callbacks.verifier_eval import VerifierEval

__all__ = ["FinalizeCovariance", "UncertaintyRouting", "VerifierEval"]
