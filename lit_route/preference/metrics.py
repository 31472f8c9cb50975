"""Validation metrics of a preference model (torchmetrics, so they reduce correctly across ranks)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import BinaryAccuracy, BinaryCalibrationError
from torchmetrics.regression import SpearmanCorrCoef
from torchmetrics.utilities import dim_zero_cat


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x`` (N,), tied values sharing the mean of their ranks; float64 (N,)."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    # each run of equal values gets the mean rank of the run
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    return ranks


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` as a detector of ``labels == 1`` (Mann–Whitney U / n₊n₋).

    Only the order of the scores matters (any value range: no squashing), ties count one half.

    Args:
        scores: (N,) any real values.
        labels: (N,) 0/1.

    Returns:
        The AUROC in [0, 1]; 0.5 when one class is absent (there is nothing to detect).
    """
    labels = labels.bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.5
    rank_sum = float(average_ranks(scores)[labels].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


class RankAUROC(Metric):
    """AUROC from the ranks of the scores, for scores of any range (``ū ≥ 1``, variances, ...).

    torchmetrics' ``BinaryAUROC`` passes inputs outside [0, 1] through a sigmoid, which saturates for ``ū`` in
    the tens and turns a perfect detector into ties; this metric keeps every score and ranks them at the end.
    """

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.scores.append(scores.detach().double().flatten())
        self.labels.append(labels.detach().long().flatten())

    def compute(self) -> torch.Tensor:
        # a list of batches on one process; one concatenated tensor after a distributed sync
        if isinstance(self.scores, list) and not self.scores:
            return torch.tensor(0.5, dtype=torch.float64)
        return torch.tensor(auroc(dim_zero_cat(self.scores), dim_zero_cat(self.labels)), dtype=torch.float64)


class PreferenceMetrics(nn.Module):
    """Accuracy of ``d > 0``, ECE of ``σ(d)`` (over both orientations of each pair), and how well ``ū`` predicts the model's errors.

    ``auroc_uncertainty`` is the AUROC of ``ū`` as a detector of errors (0.5: uninformative, 1: perfect);
    ``spearman_uncertainty`` is Spearman's ρ between ``ū`` and the error indicator.
    """

    def __init__(self, n_bins: int = 10):
        super().__init__()
        self.accuracy = BinaryAccuracy()
        self.ece = BinaryCalibrationError(n_bins=n_bins, norm="l1")
        self.auroc = RankAUROC()
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
