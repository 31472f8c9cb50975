"""``PreferenceModule``: a pairwise preference model ``(x, a, b) -> (g, u)`` with a linear or SNGP head."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import lightning as L
import torch
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from lit_route.models.backbone import (
    BackboneSpec,
    LoraSpec,
    apply_lora,
    describe,
    load_backbone,
    load_tokenizer,
)
from lit_route.models.pooling import pool_last_token
from lit_route.models.precision import warn_low_precision_trainables
from lit_route.models.sharding import clean_name, trainable_names
from lit_route.preference.losses import antisymmetric_score, bradley_terry_loss, mean_uncertainty
from lit_route.preference.metrics import PreferenceMetrics
from lit_route.uncertainty.heads import build_head


@dataclass
class SNGPConfig:
    """Options of the SNGP head (see :class:`lit_route.uncertainty.SNGPHead`).

    Args:
        num_features: Random features D.
        proj_dim: Size of the spectral-normalised projection (default: hidden size; 0 disables it).
        spectral_bound: Spectral norm bound c of the projection.
        normalize_input: LayerNorm before the projection.
        length_scale: RBF length-scale (default sqrt of the projection size).
        ridge: Prior precision s.
        weighting: ``gaussian`` (paper's code) or ``logistic`` (SNGP paper).
        mean_field_factor: λ in u = sqrt(1 + λσ²); π/8 by default, 10 in the paper's checkpoint.
        seed: Seed of the random features.
    """

    num_features: int = 1024
    proj_dim: int | None = None
    spectral_bound: float = 0.95
    normalize_input: bool = True
    length_scale: float | None = None
    ridge: float = 1.0
    weighting: str = "gaussian"
    mean_field_factor: float = math.pi / 8
    seed: int = 0


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio · lr``.

    Args:
        lr: Peak learning rate of the backbone/adapters.
        head_lr: Learning rate of the head (default: ``lr``); a fresh head usually wants more than adapters.
        weight_decay: Decoupled weight decay.
        warmup_steps: Linear warm-up steps.
        min_lr_ratio: Final learning rate as a fraction of the peak.
    """

    lr: float = 1e-4
    head_lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


class PreferenceModule(L.LightningModule):
    """Pairwise preference model: reads ``(x, a, b)`` as one sequence, pools the last token, scores it.

    Batches hold every pair in both orders: rows ``[0, B)`` are ``(x, chosen, rejected)`` (label 1) and rows
    ``[B, 2B)`` are ``(x, rejected, chosen)`` (label 0).

    Checkpoints keep only what training changed (adapters, head, precision) plus a description of the base
    model; the frozen base weights are reloaded from ``backbone.model_path``.

    Args:
        backbone: Where the base model comes from (required: ``builtin:tiny-llama`` is a tiny random model).
        lora: LoRA adapters; ``None`` trains (or, with ``freeze_backbone``, freezes) the whole backbone.
        head: ``sngp`` or ``linear``.
        sngp: SNGP head options.
        optim: Optimiser options.
        freeze_backbone: Without LoRA, train the head only.
        mode: ``pairwise`` (the method: one sequence holds x and both responses) or ``pointwise`` (the classic
            Bradley–Terry reward model: one sequence per response, ``P(a ≻ b) = σ(r_a − r_b)``), kept as the
            baseline and for comparisons with other reward-model trainers.
    """

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        lora: LoraSpec | None = None,
        head: str = "sngp",
        sngp: SNGPConfig | None = None,
        optim: OptimConfig | None = None,
        freeze_backbone: bool = False,
        mode: str = "pairwise",
    ):
        super().__init__()
        if backbone is None:
            raise ValueError("backbone: no base model given; set model.backbone.model_path "
                             "(builtin:tiny-llama is a tiny random model for tests)")
        sngp, optim = sngp or SNGPConfig(), optim or OptimConfig()
        self.save_hyperparameters()
        if mode not in ("pairwise", "pointwise"):
            raise ValueError(f"mode: expected 'pairwise' or 'pointwise', got {mode!r}")
        self.backbone_spec, self.optim, self.mode = backbone, optim, mode
        self.tokenizer = load_tokenizer(backbone)
        base = load_backbone(backbone)
        hidden = base.config.hidden_size
        self.backbone = apply_lora(base, lora, freeze_backbone)
        self.backbone.train()  # from_pretrained returns eval mode; Lightning expects train mode at fit start
        self.head_kind = head
        self.head = build_head(head, hidden, **(asdict(sngp) if head == "sngp" else {}))
        self.val_metrics = PreferenceMetrics()
        # Checkpoints hold a subset of the state dict (no frozen base weights).
        self.strict_loading = False

    # --- forward ------------------------------------------------------------------------------------------
    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, H) hidden state of the last real token after the final norm."""
        # no KV cache: nothing is generated, and building one costs a copy of every layer's keys and values
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return pool_last_token(out.last_hidden_state, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L) -> (N,) logits ``g``."""
        return self.head(self.pooled(input_ids, attention_mask))

    @property
    def has_uncertainty(self) -> bool:
        return self.head.has_uncertainty and bool(self.head.finalized)

    @torch.no_grad()
    def score_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both-order batch (2B rows) -> ``(d, ū)`` of shape (B,).

        ``d`` uses the calibrated logits ``p = g/u`` once the head is finalised (``ū = 1`` before, and always
        for the linear head).
        """
        return self.score_pooled(self.pooled(batch["input_ids"], batch["attention_mask"]))

    @torch.no_grad()
    def score_pooled(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features of a both-order batch (2B, H) -> ``(d, ū)`` of shape (B,) (see :meth:`score_batch`)."""
        if self.has_uncertainty:
            p, u = self.head.predict(h)
        else:
            p = self.head(h)
            u = torch.ones_like(p)
        b = p.shape[0] // 2
        if self.mode == "pointwise":  # rows: (x, a) then (x, b); the logit of P(a ≻ b) is p_a − p_b
            return p[:b] - p[b:], mean_uncertainty(u[:b], u[b:])
        return antisymmetric_score(p[:b], p[b:]), mean_uncertainty(u[:b], u[b:])

    # --- Lightning hooks ----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        b = logits.shape[0] // 2
        if self.mode == "pointwise":  # rows: chosen then rejected; BT on reward differences
            weights = batch.get("weights")
            diff = logits[:b] - logits[b:]
            loss = bradley_terry_loss(diff, torch.ones_like(diff), None if weights is None else weights[:b])
        else:
            loss = bradley_terry_loss(logits, batch["labels"], batch.get("weights"))
        acc = (logits[:b] > logits[b:]).float().mean()
        self.log_dict({"train/loss": loss, "train/accuracy": acc}, prog_bar=True, batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        d, u = self.score_batch(batch)
        self.val_metrics.update(d, u)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute(with_uncertainty=self.has_uncertainty)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=True, sync_dist=False)
        self.val_metrics.reset()

    def configure_optimizers(self, total_steps: int | None = None):
        """AdamW (head and adapters as two groups) with warm-up and cosine decay over ``total_steps``.

        Args:
            total_steps: Optimiser steps of the whole run; default: the Trainer's ``estimated_stepping_batches``.
                Engines without a Trainer (Fabric) pass it.
        """
        if total_steps is None:
            if self._trainer is None:
                raise ValueError("configure_optimizers: pass total_steps when no Trainer drives the module")
            total_steps = int(self._trainer.estimated_stepping_batches)
        head_params = [p for p in self.head.parameters() if p.requires_grad]
        body_params = [p for p in self.backbone.parameters() if p.requires_grad]
        warn_low_precision_trainables(head_params + body_params)
        groups = [{"params": head_params, "lr": self.optim.head_lr or self.optim.lr}]
        if body_params:
            groups.append({"params": body_params, "lr": self.optim.lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=self.optim.weight_decay)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, self.optim.warmup_steps, max(int(total_steps), 1), min_lr_rate=self.optim.min_lr_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints --------------------------------------------------------------------------------------
    def _kept_keys(self) -> set[str]:
        # names as the unwrapped model spells them (FSDP and activation checkpointing insert prefixes)
        trainable = set(trainable_names(self))
        head = {f"head.{clean_name(name)}" for name, _ in (*self.head.named_parameters(), *self.head.named_buffers())}
        return trainable | head

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kept = self._kept_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in kept}
        checkpoint["lit_route"] = {"base_model": describe(self.backbone_spec), "head": self.head_kind}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads a checkpoint's tensors; the frozen base weights it leaves out by design are not "missing"
        (they come from ``backbone.model_path``), so neither ``strict`` nor Lightning's report counts them."""
        keys = super().load_state_dict(state_dict, strict=False, assign=assign)
        kept = self._kept_keys()
        missing = [k for k in keys.missing_keys if k in kept]
        if strict and (missing or keys.unexpected_keys):
            raise RuntimeError(f"state dict: missing {missing[:5]}, unexpected {keys.unexpected_keys[:5]}")
        return type(keys)(missing, keys.unexpected_keys)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = self._kept_keys() - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trained tensors, e.g. {sorted(missing)[:3]}")


torch.serialization.add_safe_globals([SNGPConfig, OptimConfig])
