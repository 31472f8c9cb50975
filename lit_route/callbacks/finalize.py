"""``FinalizeCovariance``: after training, one no-grad pass over the training pairs builds the GP precision."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class FinalizeCovariance(L.Callback):
    """Builds the SNGP precision from the final features, then saves a finalised checkpoint.

    The pass runs once at the end of ``fit`` over the training pairs in both orders; each rank takes a disjoint
    shard, the head sums the precision across ranks (``all_reduce``) and factorises it once in float64. The
    checkpoint written afterwards holds the finalised state, so loading it needs no second pass.

    Args:
        filename: Name of the finalised checkpoint, written next to the other checkpoints.
        progress: Show a progress bar.
    """

    def __init__(self, filename: str = "finalized.ckpt", progress: bool = True):
        self.filename = filename
        self.progress = progress
        self.seconds: float | None = None
        self.ckpt_path: str | None = None

    @staticmethod
    @torch.no_grad()
    def run(module, loader, progress: bool = False) -> None:
        """Resets, accumulates over ``loader`` and finalises the precision of ``module``'s head."""
        head = module.head
        was_training = module.training
        module.eval()
        head.reset_precision()
        for batch in tqdm(loader, desc="finalising covariance", disable=not progress, unit="batch"):
            ids = batch["input_ids"].to(module.device)
            mask = batch["attention_mask"].to(module.device)
            head.accumulate(module.pooled(ids, mask))
        head.finalize()
        module.train(was_training)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if not getattr(pl_module.head, "has_uncertainty", False):
            return
        start = time.perf_counter()
        loader = trainer.datamodule.finalize_dataloader(trainer.global_rank, trainer.world_size)
        self.run(pl_module, loader, progress=self.progress and trainer.is_global_zero)
        self.seconds = time.perf_counter() - start
        head = pl_module.head
        rank_zero_info(
            f"covariance finalised over {int(head.n_accumulated)} sequences in {self.seconds:.1f}s"
            + (f" (jitter {float(head.jitter):.0e})" if float(head.jitter) else "")
        )
        directory = Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback else Path(
            trainer.log_dir or "."
        ) / "checkpoints"
        self.ckpt_path = str(directory / self.filename)
        trainer.save_checkpoint(self.ckpt_path)
        rank_zero_info(f"finalised checkpoint: {self.ckpt_path}")

    def state_dict(self) -> dict:
        return {"seconds": self.seconds, "ckpt_path": self.ckpt_path}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds = state_dict.get("seconds")
        self.ckpt_path = state_dict.get("ckpt_path")
