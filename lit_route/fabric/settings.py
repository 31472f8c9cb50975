"""The ``trainer:`` section of a config, read by the Fabric engine: the same YAML drives both engines.

Hardware options (``accelerator``, ``strategy``, ``devices``, ``num_nodes``, ``precision``) build a
:class:`lightning.fabric.Fabric`; loop options (epochs, steps, accumulation, clipping, logging cadence, output
folder) become :class:`LoopSettings`. A strategy given as ``lightning.pytorch.strategies.X`` becomes
``lightning.fabric.strategies.X`` with the same ``init_args``. Options that only change the Trainer's display are
ignored; any other option the Fabric engine does not implement is refused by name rather than silently dropped.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from importlib import import_module
from typing import Any

# Trainer options that only concern the Trainer's own display and bookkeeping
DISPLAY_ONLY = {"enable_model_summary", "num_sanity_val_steps", "enable_checkpointing", "enable_progress_bar",
                "logger", "inference_mode", "use_distributed_sampler", "barebones"}
# Trainer options the Fabric engine implements
HARDWARE = ("accelerator", "strategy", "devices", "num_nodes", "precision")
LOOP = ("max_epochs", "max_steps", "accumulate_grad_batches", "gradient_clip_val", "log_every_n_steps",
        "default_root_dir", "callbacks")


@dataclass
class LoopSettings:
    """How a Fabric loop runs.

    Args:
        max_epochs: Epochs over the training data (PM); ``None`` with ``max_steps = -1`` means 1 for the PM.
        max_steps: Optimiser steps (RLOO: sampled batches); ``-1`` means no limit.
        accumulate_grad_batches: Batches per optimiser step (PM).
        gradient_clip_val: Gradient norm clipping (PM; RLOO clips with ``model.max_grad_norm``).
        log_every_n_steps: Progress line and metrics every N optimiser steps.
        default_root_dir: Output folder: ``checkpoints/last.ckpt``, the finalised checkpoint, ``metrics.csv``.
        checkpoint_every_n_steps: Also save ``checkpoints/last.ckpt`` every N optimiser steps (taken from a
            ``ModelCheckpoint(every_n_train_steps=N)`` in ``trainer.callbacks``).
        progress: Print progress lines on rank 0.
        logger: Write ``metrics.csv`` (a Lightning ``CSVLogger``).
    """

    max_epochs: int | None = None
    max_steps: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 50
    default_root_dir: str = "."
    checkpoint_every_n_steps: int | None = None
    progress: bool = True
    logger: bool = True


def _is_default(value: Any, default: Any) -> bool:
    return value is None or value == default


def split_trainer_section(trainer: dict, defaults: dict) -> tuple[dict, LoopSettings, list]:
    """``trainer:`` (as a plain dict) -> (Fabric arguments, loop settings, callback specs).

    Args:
        trainer: The parsed ``trainer`` section.
        defaults: The Trainer's defaults (an option equal to its default counts as not set).

    Raises:
        ValueError: an option is set that the Fabric engine does not implement (named in the message).
    """
    for key, value in trainer.items():
        if key in HARDWARE or key in LOOP or key in DISPLAY_ONLY:
            continue
        if not _is_default(value, defaults.get(key)):
            raise ValueError(f"trainer.{key}: not supported by the Fabric engine (remove it or use the Trainer)")
    fabric_args = {key: trainer[key] for key in HARDWARE if trainer.get(key) is not None}
    loop = LoopSettings(
        max_epochs=trainer.get("max_epochs"),
        max_steps=trainer.get("max_steps") if trainer.get("max_steps") is not None else -1,
        accumulate_grad_batches=trainer.get("accumulate_grad_batches") or 1,
        gradient_clip_val=trainer.get("gradient_clip_val"),
        log_every_n_steps=trainer.get("log_every_n_steps") or 50,
        default_root_dir=trainer.get("default_root_dir") or ".",
        progress=trainer.get("enable_progress_bar") is not False,
        logger=trainer.get("logger") is not False,
    )
    return fabric_args, loop, list(trainer.get("callbacks") or [])


def fabric_strategy(spec: Any) -> Any:
    """A strategy name (passed to Fabric as is) or a ``class_path``/``init_args`` spec -> a Fabric strategy.

    ``lightning.pytorch.strategies.X`` maps to ``lightning.fabric.strategies.X``; nested class specs (an FSDP
    wrap policy) are instantiated by jsonargparse, as the Trainer's CLI does.
    """
    if isinstance(spec, str) or spec is None:
        return spec
    from jsonargparse import ArgumentParser
    from lightning.fabric.strategies import Strategy

    spec = dict(spec)
    class_path = str(spec["class_path"])
    name = class_path.rsplit(".", 1)[1]
    for prefix in ("lightning.pytorch.strategies.", "pytorch_lightning.strategies."):
        if class_path.startswith(prefix):
            class_path = f"lightning.fabric.strategies.{name}"
    init_args = dict(spec.get("init_args") or {})
    if class_path.startswith("lightning.fabric.strategies."):
        # the Trainer's strategies take Trainer-only arguments (checkpoint_io, precision_plugin); the parsed
        # config lists them with their defaults, which mean nothing to Fabric
        target = getattr(import_module("lightning.fabric.strategies"), name, None)
        if target is None:
            raise ValueError(f"trainer.strategy: {spec['class_path']} has no Fabric counterpart")
        accepted = inspect.signature(target).parameters
        for key in [k for k in init_args if k not in accepted]:
            if init_args.pop(key) is not None:
                raise ValueError(f"trainer.strategy.init_args.{key}: not supported by the Fabric engine")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Strategy)
    try:
        cfg = parser.parse_object({"strategy": {"class_path": class_path, "init_args": init_args}})
    except Exception as err:  # jsonargparse reports which init_arg is wrong
        raise ValueError(f"trainer.strategy: {err}") from None
    return parser.instantiate_classes(cfg).strategy


def launcher_overrides() -> set[str]:
    """Hardware options set by ``fabric run`` (its ``LT_*`` variables), which win over the YAML's."""
    return {name for name in HARDWARE if os.environ.get("LT_" + name.upper()) is not None}


def build_fabric(fabric_args: dict, loggers: list | None = None):
    """A :class:`lightning.fabric.Fabric` from the hardware options (those set by ``fabric run`` win)."""
    import lightning as L

    args = {k: v for k, v in fabric_args.items() if k not in launcher_overrides()}
    if "strategy" in args:
        args["strategy"] = fabric_strategy(args["strategy"])
    return L.Fabric(**args, loggers=loggers)


def launch(fabric) -> None:
    """``fabric.launch()``, except under ``fabric run``, which has started the processes and set up the
    environment already (Fabric refuses a second launch)."""
    if os.environ.get("LT_CLI_USED", "0") != "1":
        fabric.launch()
