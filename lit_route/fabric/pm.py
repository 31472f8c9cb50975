"""The preference model under Fabric: the Trainer's fit, covariance pass and validation as an explicit loop.

The loop drives the same :class:`~lit_route.preference.PreferenceModule` and
:class:`~lit_route.data.datamodule.PreferenceDataModule` as the Trainer: ``training_step`` and
``validation_step`` run through the strategy's wrapper, ``configure_optimizers(total_steps)`` builds AdamW and
its schedule, and :meth:`FinalizeCovariance.run` makes the covariance pass on each rank's shard of the training
pairs (the head sums the precision across ranks) for the heads that need one, as the Trainer's callback decides
(``head.needs_covariance_pass``). Every head ends at the finalised checkpoint; checkpoints are Lightning
checkpoints. Each epoch's batches are the datamodule's (seeded by ``data.seed`` and the epoch), so a resumed run
and the Trainer see the same ones.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies import FSDPStrategy

from lit_route.callbacks.finalize import FinalizeCovariance
from lit_route.fabric.checkpoint import load_checkpoint, save_checkpoint
from lit_route.fabric.recorder import MetricsRecorder
from lit_route.fabric.settings import LoopSettings

DEFAULT_MAX_EPOCHS = 1000  # the Trainer's, when neither max_epochs nor max_steps is set


def plan_steps(loop: LoopSettings, batches_per_epoch: int) -> tuple[int, int]:
    """``(epochs, optimiser steps)`` of a run, as the Trainer's ``estimated_stepping_batches`` counts them."""
    steps_per_epoch = math.ceil(batches_per_epoch / loop.accumulate_grad_batches)
    epochs = loop.max_epochs if loop.max_epochs is not None else (
        DEFAULT_MAX_EPOCHS if loop.max_steps < 0 else math.ceil(loop.max_steps / max(steps_per_epoch, 1))
    )
    total = epochs * steps_per_epoch
    if loop.max_steps >= 0:
        total = min(total, loop.max_steps)
    return epochs, total


def _check_strategy(fabric) -> None:
    from lightning.fabric.strategies import DeepSpeedStrategy

    if isinstance(fabric.strategy, DeepSpeedStrategy) and fabric.strategy.precision.precision not in ("32-true", "64-true"):
        # DeepSpeed's 16-bit engine casts the module and its ZeRO optimiser keeps one dtype for every parameter
        # group (stage_1_and_2.py: param_groups[0]['params'][0].dtype); the head's float32 group would not fit
        raise ValueError("trainer.strategy: DeepSpeed in 16-bit precision cannot optimise the PM's float32 head; "
                         "train the PM with ddp or fsdp (DeepSpeed serves RLOO)")


def _recorder(fabric) -> MetricsRecorder:
    found = next((lg for lg in fabric.loggers if isinstance(lg, MetricsRecorder)), None)
    if found is None:
        raise ValueError("fabric: create it with a MetricsRecorder among its loggers (see lit_route.fabric.pm)")
    return found


@torch.no_grad()
def validate(fabric, model, module, loader) -> dict[str, float]:
    """One validation pass (``validation_step`` + ``on_validation_epoch_end``); returns the logged metrics."""
    was_training = model.training
    model.eval()
    for i, batch in enumerate(loader):
        model.validation_step(batch, i)
    module.on_validation_epoch_end()  # computes (synced across ranks), logs and resets the metrics
    model.train(was_training)
    return {k: v for k, v in _recorder(fabric).latest.items() if k.startswith("val/")}


def fit_preference_model(
    fabric,
    module,
    datamodule,
    loop: LoopSettings | None = None,
    finalize: FinalizeCovariance | None = None,
    ckpt_path: str | None = None,
) -> dict[str, Any]:
    """Trains ``module`` on ``datamodule``, runs the covariance pass (heads that need one), validates, and saves
    checkpoints (``finalize.filename`` for every head).

    Args:
        fabric: A launched :class:`lightning.fabric.Fabric` with a :class:`MetricsRecorder` among its loggers.
        module: A :class:`~lit_route.preference.PreferenceModule`, not yet set up.
        datamodule: A :class:`~lit_route.data.datamodule.PreferenceDataModule`.
        loop: Epochs, steps, accumulation, clipping, logging, output folder.
        finalize: Covariance pass options (``filename`` of the finalised checkpoint); ``None`` for defaults.
        ckpt_path: Resume from this ``checkpoints/last.ckpt`` of an earlier run.

    Returns:
        A summary: steps, last training and validation metrics, checkpoint paths, covariance pass seconds, and
        the length-ordered feature pass of a frozen backbone with a feature cache (``None`` otherwise).
    """
    loop = loop or LoopSettings()
    finalize = finalize or FinalizeCovariance()
    root = Path(loop.default_root_dir)
    datamodule.connect(module)
    datamodule.setup("fit")
    train_loader = fabric.setup_dataloaders(datamodule.train_dataloader())
    val_loader = fabric.setup_dataloaders(datamodule.val_dataloader()) if datamodule.val_set is not None else None
    _check_strategy(fabric)
    epochs, total_steps = plan_steps(loop, len(train_loader))
    if isinstance(fabric.strategy, FSDPStrategy):  # the optimiser must hold the parameters FSDP made
        model = fabric.setup_module(module)
        config = module.configure_optimizers(total_steps=total_steps)
        optimizer = fabric.setup_optimizers(config["optimizer"])
    else:  # DDP, single device, DeepSpeed: model and optimiser together
        config = module.configure_optimizers(total_steps=total_steps)
        model, optimizer = fabric.setup(module, config["optimizer"])
    model.mark_forward_method("pooled")  # the covariance pass must go through the strategy's wrapper too
    scheduler = config["lr_scheduler"]["scheduler"]
    state: dict[str, Any] = {"state_dict": model, "optimizer": optimizer, "lr_scheduler": scheduler,
                             "epoch": 0, "global_step": 0}
    if ckpt_path:
        load_checkpoint(fabric, ckpt_path, state)  # objects in place; the counters are replaced in `state`
    recorder = _recorder(fabric)
    accumulate = loop.accumulate_grad_batches
    step, start_epoch = state["global_step"], state["epoch"]
    fabric.print(f"fit: {epochs} epoch(s), {total_steps} optimiser steps, world size {fabric.world_size}")
    val_metrics: dict[str, float] = {}
    last_ckpt = root / "checkpoints" / "last.ckpt"

    def save_last(epoch: int) -> None:
        save_checkpoint(fabric, last_ckpt, model, module, datamodule, optimizer=optimizer, lr_scheduler=scheduler,
                        epoch=epoch, global_step=step)

    # the frozen backbone's features in length order before the first batch, as under the Trainer
    feature_pass = module.feature_pass(datamodule, fabric.world_size, progress=fabric.is_global_zero)
    model.train()
    for epoch in range(start_epoch, epochs):
        if step >= total_steps:
            break
        # Fabric's loader numbers epochs by how often it was iterated, and passes that to the sampler's
        # ``set_epoch`` (the datamodule's order depends on seed + epoch only): a resumed run starts at its own
        # epoch, as the Trainer's does (``iter(loader)`` would not count: the wrapper's ``__iter__`` is lazy)
        train_loader._num_iter_calls = epoch
        n_batches = len(train_loader)
        skip = (step - epoch * math.ceil(n_batches / accumulate)) * accumulate  # batches done before a resume
        for i, batch in enumerate(train_loader):
            if i < skip:
                continue
            accumulating = (i + 1) % accumulate != 0 and i + 1 != n_batches
            with fabric.no_backward_sync(model, enabled=accumulating):
                loss = model.training_step(batch, i)
                fabric.backward(loss / accumulate)
            if accumulating:
                continue
            if loop.gradient_clip_val:
                fabric.clip_gradients(model, optimizer, max_norm=loop.gradient_clip_val)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            if step % loop.log_every_n_steps == 0 or step == total_steps:
                metrics = {k: v for k, v in recorder.latest.items() if k.startswith("train/")}
                shown = " ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in sorted(metrics.items()))
                fabric.print(f"epoch {epoch + 1}/{epochs} step {step}/{total_steps} {shown}")
            if loop.checkpoint_every_n_steps and step % loop.checkpoint_every_n_steps == 0:
                save_last(epoch)
            if step >= total_steps:
                break
        if val_loader is not None:
            val_metrics = validate(fabric, model, module, val_loader)
        save_last(epoch + 1)

    summary: dict[str, Any] = {"global_step": step, "last_ckpt": str(last_ckpt), "world_size": fabric.world_size,
                               "feature_pass": feature_pass,
                               "train": {k: v for k, v in recorder.latest.items() if k.startswith("train/")}}
    head = module.head
    start = time.perf_counter()
    covariance = bool(getattr(head, "needs_covariance_pass", False))  # the Trainer's FinalizeCovariance gate
    if covariance:
        shard = datamodule.finalize_dataloader(fabric.global_rank, fabric.world_size)
        # a Laplace head with ``prior_precision: validation`` chooses δ on the validation pairs (every rank
        # sees all of them, so every rank chooses the same δ), as under the Trainer
        wants_val = getattr(head, "prior_mode", None) == "validation" and datamodule.val_set is not None
        FinalizeCovariance.run(model, shard, progress=finalize.progress and fabric.is_global_zero,
                               val_loader=datamodule.val_dataloader() if wants_val else None)
        fabric.print(f"covariance finalised over {int(head.n_accumulated)} sequences in "
                     f"{time.perf_counter() - start:.1f}s")
    finalize.seconds = time.perf_counter() - start
    # every head ends at the same path, as `pm fit` does (heads without a posterior state need no pass)
    finalize.ckpt_path = save_checkpoint(fabric, root / finalize.filename, model, module, datamodule,
                                         epoch=epochs, global_step=step)
    fabric.print(f"finalised checkpoint: {finalize.ckpt_path}")
    summary.update(finalized_ckpt=finalize.ckpt_path, finalize_seconds=finalize.seconds)
    if covariance and val_loader is not None:  # metrics with uncertainty exist only once the pass has run
        val_metrics = validate(fabric, model, module, val_loader)
    summary["val"] = val_metrics
    if val_metrics:
        fabric.print("validation: " + " ".join(f"{k[4:]} {v:.4f}" for k, v in sorted(val_metrics.items())))
    for logger in fabric.loggers:
        logger.finalize("success")
    return summary
