"""``ContinueFrom``: start a PM fit from a trained PM checkpoint (new labels, then a fresh covariance pass)."""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


class ContinueFrom(L.Callback):
    """Loads the adapters and head of a trained PM before training goes on, on new data.

    Active learning: judged pairs (``evaluate --export_judged``, or the routing callback's ``export_judged``)
    are labels the PM never saw. Fitting on them (with the original pairs, or alone) from this checkpoint and
    letting :class:`FinalizeCovariance` run again gives a PM whose uncertainty reflects what it was taught. The
    optimiser and schedule start afresh (this is not a resume: use ``--ckpt_path`` for that).

    Args:
        pm_ckpt: A ``PreferenceModule`` checkpoint on the same base model (``None``: do nothing).
    """

    def __init__(self, pm_ckpt: str | None = None):
        self.pm_ckpt = pm_ckpt

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.pm_ckpt is None or stage != "fit":
            return
        try:
            state = torch.load(self.pm_ckpt, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ValueError(f"continue_from.pm_ckpt: {self.pm_ckpt} is not a readable checkpoint ({err})") from err
        if not isinstance(state, dict) or "lit_route" not in state:
            raise ValueError(f"continue_from.pm_ckpt: {self.pm_ckpt} is not a lit-route preference-model checkpoint")
        from lit_route.models.backbone import describe

        theirs, ours = state["lit_route"].get("base_model", {}), describe(pl_module.backbone_spec)
        if theirs.get("model_path") != ours.get("model_path") or theirs.get("gguf_file") != ours.get("gguf_file"):
            raise ValueError(f"continue_from.pm_ckpt: trained on {theirs.get('model_path')}, "
                             f"this run uses {ours.get('model_path')}")
        missing, _ = pl_module.load_state_dict(state["state_dict"], strict=False)
        trained = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        if trained & set(missing):
            raise ValueError(f"continue_from.pm_ckpt: lacks {len(trained & set(missing))} trained tensors, e.g. "
                             f"{sorted(trained & set(missing))[:2]} (another head or LoRA layout?)")
        log.info("continuing from %s (%d tensors)", self.pm_ckpt, len(state["state_dict"]))
