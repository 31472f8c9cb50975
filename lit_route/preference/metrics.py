"""Validation metrics of a preference model (torchmetrics, so they reduce correctly across ranks)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryCalibrationError
from torchmetrics.regression import SpearmanCorrCoef


class PreferenceMetrics(nn.Module):
    """Accuracy of ``d > 0``, ECE of ``σ(d)`` (over both orientations of each pair), and how well ``ū`` predicts the model's errors.

    ``auroc_uncertainty`` is the AUROC of ``ū`` as a detector of errors (0.5: uninformative, 1: perfect);
    ``spearman_uncertainty`` is Spearman's ρ between ``ū`` and the error indicator.
    """

    def __init__(self, n_bins: int = 10):
        super().__init__()
        self.accuracy = BinaryAccuracy()
        self.ece = BinaryCalibrationError(n_bins=n_bins, norm="l1")
        self.auroc = BinaryAUROC()
        self.spearman = SpearmanCorrCoef()

    def update(self, d: torch.Tensor, u: torch.Tensor) -> None:
        """``d``: (N,) scores d(chosen, rejected); ``u``: (N,) uncertainties."""
        d, u = d.float(), u.float()
        target = torch.ones_like(d, dtype=torch.long)
        errors = (d <= 0).long()
        self.accuracy.update((d > 0).long(), target)
        # both orientations: P(chosen ≻ rejected) with target 1 and P(rejected ≻ chosen) with target 0, so that
        # a model that says 0.7 and is right 70% of the time has zero calibration error
        self.ece.update(torch.sigmoid(torch.cat([d, -d])), torch.cat([target, torch.zeros_like(target)]))
        self.auroc.update(u, errors)
        self.spearman.update(u, errors.float())

    def compute(self, with_uncertainty: bool = True) -> dict[str, float]:
        out = {"accuracy": self.accuracy.compute().item(), "ece": self.ece.compute().item()}
        if with_uncertainty:
            out["auroc_uncertainty"] = self.auroc.compute().item()
            rho = self.spearman.compute().item()
            out["spearman_uncertainty"] = rho if rho == rho else 0.0  # NaN when ū or the errors are constant
        return out

    def reset(self) -> None:
        for metric in (self.accuracy, self.ece, self.auroc, self.spearman):
            metric.reset()
