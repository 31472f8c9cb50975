"""Checkpoints written by the Fabric engine, in the Trainer's format (``load_from_checkpoint`` reads them).

What a checkpoint keeps is decided by the module's own ``on_save_checkpoint`` hook (adapters, head, precision,
no frozen base weights), run on a skeleton of the state dict's names; the tensors themselves are gathered by the
strategy (under FSDP the full state dict on rank 0).
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Any

import lightning

from lit_route.models.sharding import clean_name


def checkpoint_contents(module: lightning.LightningModule) -> tuple[set[str], dict[str, Any]]:
    """What ``module.on_save_checkpoint`` keeps: ``(state-dict keys, extra entries it adds)``."""
    names = {clean_name(n) for n, _ in chain(module.named_parameters(), module.named_buffers())}
    skeleton: dict[str, Any] = {"state_dict": dict.fromkeys(names)}
    module.on_save_checkpoint(skeleton)
    kept = set(skeleton.pop("state_dict"))
    return kept, skeleton


def save_checkpoint(fabric, path: str | Path, model, module, datamodule=None, **training_state: Any) -> str:
    """Saves ``model`` (the Fabric-wrapped ``module``) as a Lightning checkpoint; returns the path.

    Args:
        fabric: The Fabric that set up ``model``.
        path: Output file.
        model: ``fabric.setup_module(module)``.
        module: The LightningModule itself (its hyperparameters and checkpoint hook).
        datamodule: Its hyperparameters are saved too (the encoder settings of ``pm score``).
        training_state: Optimiser, scheduler, step counters, callback states (for resuming).
    """
    kept, extra = checkpoint_contents(module)
    state: dict[str, Any] = {
        "state_dict": model,
        "hyper_parameters": dict(module.hparams),
        "hparams_name": "kwargs",
        "pytorch-lightning_version": lightning.__version__,
        **extra,
        **training_state,
    }
    if datamodule is not None:
        state["datamodule_hyper_parameters"] = dict(datamodule.hparams)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fabric.save(path, state, filter={"state_dict": lambda key, _: key in kept})
    fabric.barrier()
    return str(path)


def load_checkpoint(fabric, path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Restores ``state`` from a checkpoint written by :func:`save_checkpoint`.

    Modules, optimisers and stateful objects in ``state`` are loaded in place (the model non-strictly: frozen
    base weights are not in the file), plain entries are replaced by the saved values; the checkpoint's other
    entries are returned.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"ckpt_path: {path} does not exist")
    return fabric.load(path, state, strict=False)
