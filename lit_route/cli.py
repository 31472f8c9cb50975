"""``lit-route``: ``pm fit|validate|score``, ``evaluate``, ``rloo fit``.

``pm`` and ``rloo`` are LightningCLI programs (YAML configs, ``--print_config``, ``${...}`` interpolation through
omegaconf); ``pm score`` and ``evaluate`` are plain jsonargparse commands with the same config conventions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from lit_route.usage import UsageError, chain_line, one_line_usage_errors, raised_in, usage_line

USAGE = """usage: lit-route <command> [options]

commands:
  pm fit|validate --config CONFIG   train / validate a pairwise preference model (LightningCLI)
  pm score --pm_ckpt CKPT --data PATH --output scores.jsonl
                                    score pairs: d(chosen, rejected) and its uncertainty
  evaluate --config CONFIG          accuracy vs judge budget: uncertainty / random / margin / oracle routing
  rloo fit --config CONFIG          online RLHF with RLOO and uncertainty-routed rewards (LightningCLI)
  export --ckpt CKPT --output_dir DIR [--merge true]
                                    a PM or policy checkpoint as peft adapters (+ head) in save_pretrained form
  fabric pm|rloo --config CONFIG    the same configs on the Fabric engine (explicit loops; torchrun, SLURM)
  serve --config CONFIG             routed pairwise rewards over HTTP (OpenRLHF's --remote_rm_url protocol)

Each command takes --help. Errors are one line; --debug (or LIT_ROUTE_DEBUG=1) shows the traceback.
"""


# shared by every LightningCLI program: seeded, `${...}` interpolation, no environment overrides, and the
# saved config.yaml of a rerun replaces the previous one
CLI_CONVENTIONS = {
    "seed_everything_default": 0,
    "parser_kwargs": {"parser_mode": "omegaconf", "default_env": False},
    "save_config_kwargs": {"overwrite": True},
}

# third-party notices a user cannot act on; everything else Lightning says is kept
_QUIET_WARNINGS = (
    "LightningCLI's args parameter is intended",  # we pass args on purpose: `lit-route pm fit ...` is not argv[1:]
    "Starting from v1.9.0, `tensorboardX` has been removed",  # TensorBoard is an extra: lit-route[tensorboard]
    "`is_gradient_checkpointing` is deprecated",
    "`isinstance(treespec, LeafSpec)` is deprecated",
    "Metric `SpearmanCorrcoef` will save all targets",  # validation sets are small; the buffer is the point
    # under DDP, for each epoch-level value: ours come from torchmetrics, which synchronise in compute()
    "It is recommended to use `self.log(",
)


class _TipFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip:")  # adverts for Lightning's cloud services


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record (as logging's last-resort handler does), not as it was at
    the first run: a host that replaces ``sys.stderr`` between runs (a notebook, a test runner's capture) reads the
    lines where it expects them, and a closed earlier stream is never written to."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ assigns one
        pass


def _setup_logging() -> None:
    # Our own logger only: Lightning already prints its messages through its own handler.
    logger = logging.getLogger("lit_route")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("LIT_ROUTE_LOG", "INFO"))
    for noisy in ("httpx", "httpcore", "anthropic", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _TipFilter) for f in target.filters):
            target.addFilter(_TipFilter())
    # Lightning's console handlers hold the sys.stderr of the moment lightning was imported: this run's instead
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler and handler.stream not in (sys.stdout, sys.__stdout__):
                with handler.lock:  # not setStream(): it flushes the old stream, which may be closed
                    handler.stream = sys.stderr
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message))


def _cli_class(commands: tuple[str, ...]):
    """A LightningCLI that offers only ``commands`` (those the module implements), one progress-bar style, and the
    CSV logger unless another is named (Lightning would switch to TensorBoard whenever it happens to be
    installed, and ``metrics.csv`` would vanish from a run that relied on it)."""
    from lightning.pytorch.callbacks import ProgressBar as AnyBar
    from lightning.pytorch.cli import LightningCLI

    from lit_route.callbacks.progress import ProgressBar

    class CLI(LightningCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {k: v for k, v in LightningCLI.subcommands().items() if k in commands}

        def before_instantiate_classes(self):
            from lit_route.checks import check_accelerator

            # before the models load (a minute for SmolLM2), and in words Lightning's `gpu` lacks
            if self.subcommand is not None:  # None: parsed without running (run=False)
                check_accelerator("trainer.accelerator", self.config[self.subcommand].trainer.get("accelerator"))

        def _parse_ckpt_path(self):
            from lit_route.checks import check_checkpoint

            # Lightning opens the file here (for its hyperparameters), before any model: name the path first,
            # since torch's errors for a truncated or foreign file do not
            if self.config.get("subcommand"):
                check_checkpoint("ckpt_path", self.config[self.config.subcommand].get("ckpt_path"))
            super()._parse_ckpt_path()

        def _instantiate_trainer(self, config, callbacks):
            listed = list(config.get("callbacks") or []) + list(callbacks)
            if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, AnyBar) for c in listed):
                callbacks = [*callbacks, ProgressBar()]
            if config.get("logger") in (None, True):  # None is the default: "Lightning chooses"
                from lightning.pytorch.loggers import CSVLogger

                config["logger"] = CSVLogger(save_dir=config.get("default_root_dir") or ".")
            return super()._instantiate_trainer(config, callbacks)

    return CLI


def pm_cli(args: list[str], run: bool = True):
    """The LightningCLI of the preference model (``lit-route pm fit|validate``)."""
    from lit_route.callbacks.continue_from import ContinueFrom
    from lit_route.callbacks.finalize import FinalizeCovariance
    from lit_route.data.datamodule import PreferenceDataModule
    from lit_route.preference.module import PreferenceModule

    class PreferenceCLI(_cli_class(("fit", "validate"))):
        def add_arguments_to_parser(self, parser):
            parser.add_lightning_class_args(FinalizeCovariance, "finalize")
            parser.add_lightning_class_args(ContinueFrom, "continue_from")

        def after_fit(self):
            # metrics with uncertainty exist only once the covariance pass has run
            if self.model.has_uncertainty and self.datamodule.val_set is not None:
                self.trainer.validate(self.model, datamodule=self.datamodule)

    return PreferenceCLI(PreferenceModule, PreferenceDataModule, args=args, run=run, **CLI_CONVENTIONS)


def rloo_cli(args: list[str], run: bool = True):
    """The LightningCLI of RLOO policy training (``lit-route rloo fit``)."""
    from lit_route.policy.data import PromptDataModule
    from lit_route.policy.module import RLOOPolicyModule

    class RLOOCLI(_cli_class(("fit",))):
        def before_instantiate_classes(self):
            # the PM checkpoint is read after the policy and the judges have loaded (a minute for SmolLM2): a
            # missing one is named first (then a GPU asked for and missing)
            if self.subcommand is None:  # parsed without running (run=False)
                return
            model = self.config[self.subcommand].get("model") or {}
            ckpt = model.get("pm_ckpt") if hasattr(model, "get") else None
            if ckpt and not Path(ckpt).exists():
                raise FileNotFoundError(f"model.pm_ckpt: {ckpt} does not exist; train a PM first (`lit-route pm fit "
                                        "--config ...` writes finalized.ckpt in its trainer.default_root_dir)")
            super().before_instantiate_classes()

        def _instantiate_trainer(self, config, callbacks):
            return super()._instantiate_trainer(config, [*callbacks, *_last_checkpoint(config, callbacks)])

    return RLOOCLI(RLOOPolicyModule, PromptDataModule, args=args, run=run, **CLI_CONVENTIONS)


def _last_checkpoint(config, callbacks) -> list:
    """``checkpoints/last.ckpt`` in every RLOO run, as under the Fabric engine (resume with ``--ckpt_path``):
    without a listed ``ModelCheckpoint`` (and with checkpointing on), a ``ModelCheckpoint(save_last=True)`` takes
    the place of Lightning's default one. A listed one is the user's to configure (the shipped configs set
    ``save_last: true``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    if config.get("enable_checkpointing", True) is False:
        return []
    if any(isinstance(c, ModelCheckpoint) for c in [*(config.get("callbacks") or []), *callbacks]):
        return []
    return [ModelCheckpoint(save_last=True)]


def pm_score(
    pm_ckpt: str,
    data: list[str] | str,
    output: str,
    format: str = "auto",
    skip_invalid: bool = False,
    batch_size: int = 8,
    device: str = "cpu",
    limit_per_file: int | None = None,
) -> dict:
    """Scores preference pairs with a trained preference model.

    Writes one JSON line per pair: ``id``, ``subset``, ``score`` (= d(chosen, rejected)), ``uncertainty`` (= ū)
    and ``correct`` (score > 0).

    Args:
        pm_ckpt: A ``PreferenceModule`` checkpoint (the finalised one for SNGP uncertainties).
        data: Pair file(s) in any supported format; ``bundled:<path>`` for shipped data.
        output: Where to write the JSON lines.
        format: Reader (``auto`` detects it).
        skip_invalid: Skip (and count) malformed records instead of failing.
        batch_size: Pairs per forward pass.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        limit_per_file: Score at most this many pairs per file.
    """
    from lit_route.checks import check_device
    from lit_route.data.readers import load_pairs
    from lit_route.eval.scores import write_scores
    from lit_route.preference.io import load_preference_model
    from lit_route.preference.scoring import score_pairs

    check_device("device", device)
    pairs = load_pairs(data, format, skip_invalid, limit_per_file)
    module, encoder = load_preference_model(pm_ckpt, device)
    d, u = score_pairs(module, pairs, encoder, batch_size=batch_size)
    write_scores(output, pairs, d, u)
    summary = {
        "n_pairs": len(pairs),
        "accuracy": float((d > 0).float().mean()),
        "truncated": encoder.n_truncated,
        "output": output,
    }
    print(json.dumps(summary))
    return summary


def pm_score_cli(args: list[str], run: bool = True):
    """``lit-route pm score --pm_ckpt CKPT --data PATH --output scores.jsonl``; ``run=False`` only parses."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lit-route pm score", parser_mode="omegaconf", default_env=False,
                            description=pm_score.__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(pm_score, as_positional=False)
    cfg = parser.parse_args(args)
    if not run:
        return cfg
    return pm_score(**{k: v for k, v in cfg.as_dict().items() if k not in ("config", "__path__")})


def error_line(err: BaseException) -> str:
    """One line for an error: lit_route's own message found in the chain of causes (it names the file, line or
    option), a class path that cannot be imported, else the outermost error's first line (for jsonargparse's
    aggregated messages, the line in it that names the option)."""
    import jsonargparse

    line = chain_line(err)
    if line:
        return line
    text = str(err).strip()
    if raised_in(err, jsonargparse) and len(text.splitlines()) > 1:
        return usage_line(text, [])
    text = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LIT_ROUTE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        if debug:  # the parser's own output: the usage and its message
            _dispatch(argv)
        else:
            with one_line_usage_errors():
                _dispatch(argv)
    except KeyboardInterrupt:
        print("lit-route: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except UsageError as err:
        print(f"lit-route: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        if debug:
            raise
        print(f"lit-route: error: {error_line(err)}  (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] == "--version":
        from lit_route import __version__

        print(f"lit-route {__version__}")
        return
    _setup_logging()
    command, rest = argv[0], argv[1:]
    if command == "pm":
        if rest and rest[0] == "score":
            pm_score_cli(rest[1:])
            return
        pm_cli(rest)
    elif command == "rloo":
        rloo_cli(rest)
    elif command == "export":
        from lit_route.artefacts.export import export_cli

        export_cli(rest)
    elif command == "fabric":
        from lit_route.fabric.cli import main as fabric_main

        fabric_main(rest)
    elif command == "serve":
        from lit_route.integrations.server import serve_cli

        serve_cli(rest)
    elif command == "evaluate":
        from lit_route.eval.run import evaluate_cli

        evaluate_cli(rest)
    else:
        print(f"lit-route: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
