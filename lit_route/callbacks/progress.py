"""The progress bar of ``lit-route`` runs: tqdm, like the bars of scoring, judging and the covariance pass."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar without the logger's version number (``v_num``), which says nothing about the run."""

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
