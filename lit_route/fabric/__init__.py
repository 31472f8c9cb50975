"""The Fabric engine: explicit loops over the same modules, datamodules, configs and callbacks as the Trainer.

``lit-route fabric pm|rloo --config CONFIG`` runs them from the Trainer's YAML; :func:`fit_preference_model` and
:func:`fit_rloo` are the loops for users who launch Fabric themselves.
"""

from lit_route.fabric.pm import fit_preference_model
from lit_route.fabric.recorder import MetricsRecorder
from lit_route.fabric.rloo import fit_rloo
from lit_route.fabric.settings import LoopSettings, build_fabric
from lit_route.fabric.view import FabricTrainerView

__all__ = ["FabricTrainerView", "LoopSettings", "MetricsRecorder", "build_fabric", "fit_preference_model", "fit_rloo"]
