"""What an RLOO policy checkpoint keeps: the trained tensors, the base model's name, the sampled-batch count and
the reward pipeline's pending batches (every rank's)."""

from __future__ import annotations

from lit_route.models.backbone import describe
from lit_route.policy.pipeline import gather_ranks


class PolicyCheckpointing:
    """Checkpoint hooks of :class:`~lit_route.policy.module.RLOOPolicyModule` (mixed in before the LightningModule).

    Only the trainable tensors are written: the frozen base (and reference) weights come from
    ``policy.model_path`` when the checkpoint is loaded.
    """

    def _kept_keys(self) -> set[str]:
        return {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads a checkpoint's trained tensors; the frozen base (and reference) weights it leaves out by design
        come from ``policy.model_path`` and are not reported missing."""
        keys = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in keys.missing_keys if k in self._kept_keys()]
        if strict and (missing or keys.unexpected_keys):
            raise RuntimeError(f"state dict: missing {missing[:5]}, unexpected {keys.unexpected_keys[:5]}")
        return type(keys)(missing, keys.unexpected_keys)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self._kept_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lit_route"] = {"base_model": describe(self.policy_spec), "pm_ckpt": self.hparams.pm_ckpt,
                                   "batches_sampled": self.batches_sampled}
        if self.hparams.get("reward_pipeline", 0):  # every rank's pending batches (rank 0 writes the file)
            world = self._trainer.world_size if self._trainer is not None else getattr(self._fabric, "world_size", 1)
            checkpoint["lit_route"]["pending"] = gather_ranks(self.pipeline.state_dict(), world)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("lit_route", {})
        self.batches_sampled = state.get("batches_sampled")
        pending = state.get("pending")
        if pending:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self.pipeline.load_state_dict(pending[rank] if rank < len(pending) else [], self.device)
