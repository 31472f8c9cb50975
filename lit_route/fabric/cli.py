"""``lit-route fabric pm|rloo --config CONFIG``: the Fabric engine, driven by the Trainer's YAML.

The config is parsed with the Trainer CLI's conventions (jsonargparse, ``${...}`` interpolation, the Trainer's own
signature for ``trainer:``), so every ``lit-route pm fit`` / ``rloo fit`` config runs here unchanged. Launch it
like any Fabric program: ``trainer.devices > 1`` starts the processes itself; under ``torchrun``, ``fabric run`` or
SLURM (``srun``) the processes are already running and Fabric joins them.
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any

USAGE = """usage: lit-route fabric pm|rloo --config CONFIG [--trainer.devices N ...] [--ckpt_path CKPT]

  pm     train a preference model, then the covariance pass (the config of `lit-route pm fit`)
  rloo   online RLHF with RLOO and routed rewards (the config of `lit-route rloo fit`)
"""


def _programs() -> dict[str, dict[str, Any]]:
    from lit_route.callbacks.continue_from import ContinueFrom
    from lit_route.callbacks.finalize import FinalizeCovariance
    from lit_route.data.datamodule import PreferenceDataModule
    from lit_route.policy.data import PromptDataModule
    from lit_route.policy.module import RLOOPolicyModule
    from lit_route.preference.module import PreferenceModule

    return {
        "pm": {"model": PreferenceModule, "data": PreferenceDataModule,
               "extra": {"finalize": FinalizeCovariance, "continue_from": ContinueFrom}},
        "rloo": {"model": RLOOPolicyModule, "data": PromptDataModule, "extra": {}},
    }


def build_parser(program: str):
    """The jsonargparse parser of ``lit-route fabric <program>``."""
    import lightning as L
    from jsonargparse import ActionConfigFile, ArgumentParser

    spec = _programs()[program]
    parser = ArgumentParser(prog=f"lit-route fabric {program}", parser_mode="omegaconf", default_env=False,
                            description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--seed_everything", type=int | bool, default=0, help="Seed of every process (true: random)")
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="Resume from this checkpoints/last.ckpt")
    parser.add_class_arguments(L.Trainer, "trainer", instantiate=False, fail_untyped=False)
    parser.add_class_arguments(spec["model"], "model")
    parser.add_class_arguments(spec["data"], "data")
    for key, cls in spec["extra"].items():
        parser.add_class_arguments(cls, key)
    return parser


def trainer_defaults() -> dict[str, Any]:
    import lightning as L

    return {name: p.default for name, p in inspect.signature(L.Trainer.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def instantiate(parser, cfg, keys: list[str]) -> dict[str, Any]:
    """The objects of the given config sections (the ``trainer`` section is read, never instantiated)."""
    sub = cfg.clone()
    del sub["trainer"]
    objects = parser.instantiate_classes(sub)
    return {key: objects[key] for key in keys}


def instantiate_callbacks(specs: list) -> list:
    """``trainer.callbacks`` specs -> callback objects."""
    if not specs:
        return []
    import lightning as L
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[L.Callback])
    cfg = parser.parse_object({"callbacks": [s.as_dict() if hasattr(s, "as_dict") else s for s in specs]})
    return list(parser.instantiate_classes(cfg).callbacks)


def _loggers(loop) -> list:
    from lit_route.fabric.recorder import MetricsRecorder

    loggers: list = [MetricsRecorder()]
    if loop.logger:
        from lightning.fabric.loggers import CSVLogger

        loggers.append(CSVLogger(loop.default_root_dir, name="fabric_logs"))
    return loggers


def run(program: str, args: list[str]) -> dict[str, Any]:
    """Parses ``args`` for ``program`` (``pm`` or ``rloo``), launches Fabric and runs the loop; returns its summary."""
    import lightning as L

    from lit_route.checks import check_accelerator, check_checkpoint
    from lit_route.fabric.settings import build_fabric, launch, split_trainer_section

    parser = build_parser(program)
    cfg = parser.parse_args(args)
    check_checkpoint("ckpt_path", cfg.ckpt_path)  # before any model is loaded, with the path in the message
    check_accelerator("trainer.accelerator", cfg.trainer.accelerator)  # Fabric's own for `gpu` names no option
    trainer = cfg.trainer.as_dict()
    try:
        fabric_args, loop, callback_specs = split_trainer_section(trainer, trainer_defaults())
        fabric = build_fabric(fabric_args, loggers=_loggers(loop))
    except ValueError as err:  # one line naming the option, as for any other bad input
        print(f"lit-route fabric {program}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    launch(fabric)
    seed = cfg.seed_everything
    if seed is not False:
        L.seed_everything(None if seed is True else seed, workers=True)
    if program == "pm":
        from lit_route.fabric.pm import fit_preference_model

        objs = instantiate(parser, cfg, ["model", "data", "finalize", "continue_from"])
        objs["continue_from"].setup(None, objs["model"], "fit")  # a trained PM's adapters and head, if given
        if callback_specs:
            fabric.print("trainer.callbacks: ignored by the Fabric PM engine (it saves checkpoints itself)")
        summary = fit_preference_model(fabric, objs["model"], objs["data"], loop, objs["finalize"], cfg.ckpt_path)
    else:
        from lit_route.fabric.rloo import fit_rloo

        objs = instantiate(parser, cfg, ["model", "data"])
        callbacks = instantiate_callbacks(callback_specs)
        summary = fit_rloo(fabric, objs["model"], objs["data"], loop, callbacks, cfg.ckpt_path)
    if fabric.is_global_zero:
        print(json.dumps(summary, default=str))
    return summary


def main(argv: list[str]) -> None:
    """``lit-route fabric ...``."""
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("pm", "rloo"):
        print(USAGE, file=sys.stdout if not argv or argv[0] in ("-h", "--help") else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(2)
        return
    run(argv[0], argv[1:])
