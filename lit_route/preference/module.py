"""``PreferenceModule``: a pairwise preference model ``(x, a, b) -> (g, u)`` with a linear or SNGP head."""

from __future__ import annotations

import logging
import weakref
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
from lit_route.models.pooling import POOLINGS, pool
from lit_route.models.precision import warn_low_precision_trainables
from lit_route.models.sharding import clean_name, trainable_names
from lit_route.models.split import bottom_hidden, right_padded, run_top, trainable_start_layer
from lit_route.preference.features import FeatureCache, fill_feature_cache, weights_fingerprint
from lit_route.preference.head_configs import EnsembleConfig, LaplaceConfig, MCDropoutConfig, SNGPConfig
from lit_route.preference.losses import antisymmetric_score, bradley_terry_loss
from lit_route.preference.metrics import PreferenceMetrics
from lit_route.uncertainty.registry import build_head

log = logging.getLogger(__name__)


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
    """Pairwise preference model: reads ``(x, a, b)`` as one sequence, pools it (its last token), scores it.

    Batches hold every pair in both orders: rows ``[0, B)`` are ``(x, chosen, rejected)`` (label 1) and rows
    ``[B, 2B)`` are ``(x, rejected, chosen)`` (label 0).

    Checkpoints keep only what training changed (adapters, head, precision) plus a description of the base
    model; the frozen base weights are reloaded from ``backbone.model_path``.

    Args:
        backbone: Where the base model comes from (required: ``builtin:tiny-llama`` is a tiny random model).
        lora: LoRA adapters; ``None`` trains (or, with ``freeze_backbone``, freezes) the whole backbone.
        head: The uncertainty method: ``sngp``, ``laplace`` (last-layer Laplace), ``mc_dropout``, ``ensemble``
            (deep ensemble of heads), ``margin`` (the linear head, ū from |d|) or ``linear`` (no uncertainty).
        sngp: SNGP head options.
        optim: Optimiser options.
        freeze_backbone: Without LoRA, train the head only.
        mode: ``pairwise`` (the method: one sequence holds x and both responses) or ``pointwise`` (the classic
            Bradley–Terry reward model: one sequence per response, ``P(a ≻ b) = σ(r_a − r_b)``), kept as the
            baseline and for comparisons with other reward-model trainers.
        laplace: Laplace head options.
        mc_dropout: MC dropout head options.
        ensemble: Ensemble head options.
        feature_cache: Folder of the feature cache. When nothing below the head trains (``freeze_backbone``
            without LoRA), pooled features are cached: the backbone runs once per distinct sequence, ever. With
            LoRA on the top layers only (``lora.top_layers``), the hidden states entering the lowest adapted
            layer are cached (kept in memory: a few GB for a few thousand pairs), and each step runs only the
            adapted layers. Not saved in checkpoints (a loaded model scores without it unless given one).
        pooling: ``last_token`` (the hidden state of the sequence's last token, after the final norm) or
            ``mean`` (the mean over all its tokens): with a cut backbone (``backbone.num_layers``), a middle
            layer's tokens, which carry more of what a short response contains than its last one does.
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
        laplace: LaplaceConfig | None = None,
        mc_dropout: MCDropoutConfig | None = None,
        ensemble: EnsembleConfig | None = None,
        feature_cache: str | None = None,
        pooling: str = "last_token",
    ):
        super().__init__()
        if backbone is None:
            raise ValueError("backbone: no base model given; set model.backbone.model_path "
                             "(builtin:tiny-llama is a tiny random model for tests)")
        sngp, optim = sngp or SNGPConfig(), optim or OptimConfig()
        laplace, mc_dropout = laplace or LaplaceConfig(), mc_dropout or MCDropoutConfig()
        ensemble = ensemble or EnsembleConfig()
        self.save_hyperparameters(ignore=["feature_cache"])
        if mode not in ("pairwise", "pointwise"):
            raise ValueError(f"mode: expected 'pairwise' or 'pointwise', got {mode!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {sorted(POOLINGS)}, got {pooling!r}")
        self.pooling = pooling
        self.backbone_spec, self.optim, self.mode = backbone, optim, mode
        self.tokenizer = load_tokenizer(backbone)
        base = load_backbone(backbone)
        hidden = base.config.hidden_size
        self.backbone = apply_lora(base, lora, freeze_backbone)
        self.backbone.train()  # from_pretrained returns eval mode; Lightning expects train mode at fit start
        self.head_kind = head
        options = {"sngp": sngp, "laplace": laplace, "mc_dropout": mc_dropout, "ensemble": ensemble}.get(head)
        self.head = build_head(head, hidden, **(asdict(options) if options is not None else {}))
        self.val_metrics = PreferenceMetrics()
        # Checkpoints hold a subset of the state dict (no frozen base weights).
        self.strict_loading = False
        self.feature_cache = FeatureCache(feature_cache) if feature_cache else None

    # --- forward ------------------------------------------------------------------------------------------
    @property
    def backbone_frozen(self) -> bool:
        """Nothing below the head trains: the pooled feature is a fixed function of the tokens."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def _backbone_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # no KV cache: nothing is generated, and building one costs a copy of every layer's keys and values
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return pool(out.last_hidden_state, attention_mask, self.pooling)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, H) pooled hidden states after the final norm (``pooling``).

        With a feature cache, what the frozen part of the backbone computes is read from the cache when these
        exact token ids were seen before: the pooled feature when nothing below the head trains, or the hidden
        states entering the lowest trainable layer (LoRA on the top layers), from which only the trainable
        layers run.
        """
        if self.feature_cache is None:
            return self._backbone_pooled(input_ids, attention_mask)
        if self.backbone_frozen:
            self._bind_cache("pooled")
            was_training = self.backbone.training
            self.backbone.eval()  # a frozen feature extractor is deterministic: no dropout in cached features
            try:
                return self.feature_cache.get_or_compute(input_ids, attention_mask, self._backbone_pooled)
            finally:
                self.backbone.train(was_training)
        start = trainable_start_layer(self.backbone)
        if start is None or not right_padded(attention_mask):
            return self._backbone_pooled(input_ids, attention_mask)
        self._bind_cache(f"inputs_of_layer_{start}")
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            hidden = self.feature_cache.get_or_compute_hidden(
                input_ids, attention_mask, lambda i, m: bottom_hidden(self.backbone, start, i, m))
        finally:
            self.backbone.train(was_training)
        hidden = hidden.to(next(self.backbone.parameters()).dtype)
        return pool(run_top(self.backbone, start, hidden, attention_mask), attention_mask, self.pooling)

    def _bind_cache(self, kind: str) -> None:
        import hashlib
        import json

        if getattr(self, "_cache_kind", None) == kind and self.feature_cache.model_key is not None:
            return
        desc = {**describe(self.backbone_spec), "dtype": self.backbone_spec.dtype, "pooling": self.pooling,
                "weights": weights_fingerprint(self.backbone)}
        if kind != "pooled":
            desc["cached"] = kind
        # unset fields do not enter the key: a field added to the description later, unset, keeps caches valid
        desc = {k: v for k, v in desc.items() if v is not None}
        key = hashlib.blake2b(json.dumps(desc, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()
        self.feature_cache.bind(key, desc)
        self._cache_kind = kind

    def flush_feature_cache(self) -> None:
        if self.feature_cache is not None:
            self.feature_cache.flush()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L) -> (N,) logits ``g``."""
        return self.head(self.pooled(input_ids, attention_mask))

    @property
    def has_uncertainty(self) -> bool:
        return self.head.has_uncertainty and self.head.ready

    @torch.no_grad()
    def score_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both-order batch (2B rows) -> ``(d, ū)`` of shape (B,).

        ``d`` uses the calibrated logits ``p = g/u`` once the head is ready (after the covariance pass for
        SNGP and Laplace; ``ū = 1`` before, and always for the linear head).
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
        # pointwise rows: (x, a) then (x, b); the logit of P(a ≻ b) is p_a − p_b
        d = p[:b] - p[b:] if self.mode == "pointwise" else antisymmetric_score(p[:b], p[b:])
        if not self.has_uncertainty:
            return d, torch.ones_like(d)
        return d, self.head.pair_uncertainty(d, u[:b], u[b:])

    # --- Lightning hooks ----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        h = self.pooled(batch["input_ids"], batch["attention_mask"])
        if getattr(self.head, "needs_length_scale", False):
            self._set_length_scale(h.detach())
        members = self.head.member_logits(h)  # (2B, M)
        b = members.shape[0] // 2
        weights = batch.get("weights")
        boot = self.head.bootstrap_weights(b)  # (B, M): each member's weight of each pair, or None
        losses = []
        for m in range(members.shape[1]):
            w = weights[:b] if weights is not None else None
            if boot is not None:
                w = boot[:, m] if w is None else w * boot[:, m]
            if self.mode == "pointwise":  # rows: chosen then rejected; BT on reward differences
                diff = members[:b, m] - members[b:, m]
                losses.append(bradley_terry_loss(diff, torch.ones_like(diff), w))
            else:  # both orders of a pair carry the pair's weight
                losses.append(bradley_terry_loss(members[:, m], batch["labels"], None if w is None else torch.cat([w, w])))
        loss = torch.stack(losses).mean()
        logits = members.mean(1)
        acc = (logits[:b] > logits[b:]).float().mean()
        self.log_dict({"train/loss": loss, "train/accuracy": acc}, prog_bar=True, batch_size=b)
        return loss

    @torch.no_grad()
    def _set_length_scale(self, h: torch.Tensor, max_pairs: int = 64) -> None:
        """The SNGP median heuristic before the first update, with each pair's two rows known (rows ``i`` and
        ``i + B``), so that a pair's distance to its own twin is never counted.

        The first batch decides when it holds two pairs or more (any engine that calls ``training_step`` gets
        the same length-scale). With one pair per batch there is no distance between different pairs in it:
        up to ``max_pairs`` pairs of the training data (the datamodule's unshuffled covariance loader) are
        read instead, from the Trainer's datamodule or, without a Trainer, the one given to :meth:`connect_data`.
        """
        b = h.shape[0] // 2
        firsts, seconds = [h[:b]], [h[b:]]
        dm, rank, world = self._training_pairs_source()
        if b < 2 and dm is not None and hasattr(dm, "finalize_dataloader"):
            firsts, seconds, b = [], [], 0
            for batch in dm.finalize_dataloader(rank, world):
                feats = self.pooled(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
                half = feats.shape[0] // 2
                firsts.append(feats[:half])
                seconds.append(feats[half:])
                b += half
                if b >= max_pairs:
                    break
        z = self.head.project(torch.cat(firsts + seconds))
        self.head.set_length_scale(z, twin_offset=b)
        log.info("SNGP length-scale %.4g (median heuristic over %d pairs)", float(self.head.features.length_scale), b)

    def on_fit_start(self) -> None:
        self.feature_pass(getattr(self.trainer, "datamodule", None), self.trainer.world_size,
                          progress=self.trainer.progress_bar_callback is not None)

    def feature_pass(self, datamodule, world_size: int, progress: bool = True) -> dict[str, int] | None:
        """The frozen backbone's one pass over the training and validation pairs, in length order, before the
        first epoch (the Trainer's ``on_fit_start``; the Fabric loop calls it itself): shuffled training batches
        would pad every sequence to the longest of its batch.

        Returns:
            :func:`fill_feature_cache`'s summary, or ``None`` when there is nothing to fill: no feature cache, a
            backbone that trains, no data, or several processes (each rank then reads its own shard as it goes).
        """
        if self.feature_cache is None or not self.backbone_frozen or datamodule is None or world_size != 1:
            return None
        sequences = [ids for data in (datamodule.train_set, datamodule.val_set) if data is not None
                     for ab, ba, _ in data.items for ids in (ab, ba)]
        return fill_feature_cache(self, sequences, self.tokenizer.pad_token_id, progress=progress)

    def connect_data(self, datamodule) -> None:
        """Lets the module read its training pairs without a Trainer (``PreferenceDataModule.connect`` calls it).

        Only a weak reference is kept: the module never keeps the data alive, and pickles without it.
        """
        self._data_ref = weakref.ref(datamodule)

    def _training_pairs_source(self):
        """``(datamodule, rank, world size)``: the Trainer's datamodule, else the one given to
        :meth:`connect_data` with Fabric's rank (or a single process); ``None`` when there is neither."""
        if self._trainer is not None and getattr(self._trainer, "datamodule", None) is not None:
            return self._trainer.datamodule, self._trainer.global_rank, self._trainer.world_size
        ref = self.__dict__.get("_data_ref")
        dm = ref() if ref is not None else None
        fabric = self._fabric
        return dm, (fabric.global_rank if fabric else 0), (fabric.world_size if fabric else 1)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_data_ref", None)  # a weak reference cannot be pickled (spawned processes, deepcopy)
        return state

    def on_train_epoch_end(self) -> None:
        self.flush_feature_cache()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        d, u = self.score_batch(batch)
        self.val_metrics.update(d, u)

    def on_validation_epoch_end(self) -> None:
        self.flush_feature_cache()
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
        state = checkpoint["state_dict"]
        missing = self._kept_keys() - set(state)
        # checkpoints written before the spectral layer kept its exact σ: 0 means "not taken", and the layer
        # bounds its weight with the stored power-iteration vectors, as those checkpoints were scored
        for key in [k for k in missing if k.endswith(".sigma") and k.startswith("head.")]:
            state[key] = torch.zeros(())
            missing.discard(key)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trained tensors, e.g. {sorted(missing)[:3]}")


torch.serialization.add_safe_globals([SNGPConfig, OptimConfig, LaplaceConfig, MCDropoutConfig, EnsembleConfig])
