"""The pairwise preference model: LightningModule, losses, metrics and ``score_pairs``."""

from lit_route.preference.losses import antisymmetric_score, bradley_terry_loss, mean_uncertainty
from lit_route.preference.module import PreferenceModule, SNGPConfig
from lit_route.preference.scoring import score_pairs

__all__ = [
    "PreferenceModule",
    "SNGPConfig",
    "antisymmetric_score",
    "bradley_terry_loss",
    "mean_uncertainty",
    "score_pairs",
]
