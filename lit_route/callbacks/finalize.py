"""``FinalizeCovariance``: after training, one no-grad pass over the training pairs builds the GP precision."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from lit_route.models.sharding import call_through, is_fsdp

log = logging.getLogger(__name__)


class FinalizeCovariance(L.Callback):
    """Builds the posterior precision of an SNGP or Laplace head from the final features, then saves a
    finalised checkpoint.

    The pass runs once at the end of ``fit`` over the training pairs in both orders; each rank takes a disjoint
    shard, the head sums the precision across ranks (``all_reduce``) and factorises it once in float64. The
    checkpoint written afterwards holds the finalised state, so loading it needs no second pass. With a
    frozen backbone and a feature cache the pass reads the cached features: it costs seconds. A Laplace head
    with ``prior_precision: validation`` is also shown the validation pairs. Heads without a posterior state
    (linear, margin, MC dropout, ensemble) need no pass; their finalised checkpoint is written all the same,
    so every method ends at the same path.

    It is written next to the run's other checkpoints and, with ``stable_copy``, also as
    ``<trainer.default_root_dir>/<filename>``: a path that does not change with the run's version number, which
    the shipped evaluation and RLOO configs point at (the latest fit wins).

    Args:
        filename: Name of the finalised checkpoint.
        progress: Show a progress bar.
        stable_copy: Also write the checkpoint to ``<default_root_dir>/<filename>``.
    """

    def __init__(self, filename: str = "finalized.ckpt", progress: bool = True, stable_copy: bool = True):
        self.filename = filename
        self.progress = progress
        self.stable_copy = stable_copy
        self.stable_path: str | None = None
        self.seconds: float | None = None
        self.ckpt_path: str | None = None

    @staticmethod
    @torch.no_grad()
    def run(module, loader, progress: bool = False, pooled=None, val_loader=None) -> None:
        """Resets, accumulates over ``loader`` and finalises the precision of ``module``'s head; the
        ``val_loader`` batches go to a head that selects its prior on validation pairs.

        ``pooled`` computes the features (default ``module.pooled``); under FSDP it must run through the root
        wrapper, which gathers the root unit's parameters.
        """
        head = module.head
        pooled = pooled or module.pooled
        was_training = module.training
        module.eval()
        head.reset_precision()
        for batch in tqdm(loader, desc="finalising covariance", disable=not progress, unit="batch"):
            ids = batch["input_ids"].to(module.device)
            mask = batch["attention_mask"].to(module.device)
            head.accumulate(pooled(ids, mask))
        if val_loader is not None and hasattr(head, "select_prior_on"):
            feats, labels = [], []
            for batch in val_loader:
                feats.append(pooled(batch["input_ids"].to(module.device), batch["attention_mask"].to(module.device)))
                labels.append(batch["labels"].to(module.device))
            if feats:
                head.select_prior_on(torch.cat(feats), torch.cat(labels))
        elif getattr(head, "prior_mode", None) == "validation":  # said, never a silent change of method
            log.warning("laplace.prior_precision: validation, but there are no validation pairs "
                        "(data.val or data.val_fraction > 0); the prior is chosen by the marginal likelihood")
        head.finalize()
        if hasattr(module, "flush_feature_cache"):
            module.flush_feature_cache()
        module.train(was_training)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        head = pl_module.head
        start = time.perf_counter()
        if getattr(head, "needs_covariance_pass", False):
            dm = trainer.datamodule
            loader = dm.finalize_dataloader(trainer.global_rank, trainer.world_size)
            wants_val = getattr(head, "prior_mode", None) == "validation" and getattr(dm, "val_set", None) is not None
            pooled = call_through(trainer.strategy.model, pl_module, "pooled") if is_fsdp(trainer.strategy.model) else None
            self.run(pl_module, loader, progress=self.progress and trainer.is_global_zero, pooled=pooled,
                     val_loader=dm.val_dataloader() if wants_val else None)
            self.seconds = time.perf_counter() - start
            rank_zero_info(
                f"covariance finalised over {int(head.n_accumulated)} sequences in {self.seconds:.1f}s"
                + (f" (jitter {float(head.jitter):.0e})" if float(head.jitter) else "")
            )
        else:
            self.seconds = 0.0
        directory = Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback else Path(
            trainer.log_dir or "."
        ) / "checkpoints"
        self.ckpt_path = str(directory / self.filename)
        trainer.save_checkpoint(self.ckpt_path, weights_only=False)  # the full state, said (else Lightning says it)
        rank_zero_info(f"finalised checkpoint: {self.ckpt_path}")
        if self.stable_copy:
            self.stable_path = str(Path(trainer.default_root_dir) / self.filename)
            if Path(self.stable_path).resolve() != Path(self.ckpt_path).resolve():
                trainer.save_checkpoint(self.stable_path, weights_only=False)  # a collective under DDP/FSDP, like the first save
                rank_zero_info(f"also written as {self.stable_path}")

    def state_dict(self) -> dict:
        return {"seconds": self.seconds, "ckpt_path": self.ckpt_path, "stable_path": self.stable_path}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds = state_dict.get("seconds")
        self.ckpt_path = state_dict.get("ckpt_path")
        self.stable_path = state_dict.get("stable_path")
