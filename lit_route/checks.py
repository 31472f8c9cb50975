"""Checks of numeric, choice, path and device options, raised at construction with a one-line message naming the
option."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Sequence
from pathlib import Path


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, choices))}; got {value!r}")


def check_fraction(name: str, value: float, *, open_low: bool = False) -> None:
    """``value`` in [0, 1] (in (0, 1] with ``open_low``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > 1 or value < 0 or (open_low and value == 0):
        raise ValueError(f"{name}: expected a number in {'(0' if open_low else '[0'}, 1]; got {value!r}")


def check_nonnegative(name: str, value, *, integer: bool = False, positive: bool = False) -> None:
    """``value`` >= 0 (> 0 with ``positive``), an integer with ``integer``."""
    kind = int if integer else int | float
    ok = isinstance(value, kind) and not isinstance(value, bool) and (integer or math.isfinite(value))
    if not ok or value < 0 or (positive and value == 0):
        what = "an integer" if integer else "a number"
        raise ValueError(f"{name}: expected {what} {'> 0' if positive else '>= 0'}; got {value!r}")


def check_optional(name: str, value, **kwargs) -> None:
    """As :func:`check_nonnegative`, ``None`` allowed (no limit)."""
    if value is not None:
        check_nonnegative(name, value, **kwargs)


# values of Lightning's ``ckpt_path`` that name no file
_CKPT_ALIASES = ("last", "best", "hpc", "registry")


def check_checkpoint(name: str, path: str | None) -> None:
    """A checkpoint file torch can open, named in the error when it is not: missing, empty, truncated (a zip
    archive without its central directory) or not a ``torch.save`` file. Folders (DeepSpeed's and sharded FSDP
    checkpoints), remote URLs and Lightning's aliases (``last``, ``best``) are left to Lightning."""
    if path is None or path in _CKPT_ALIASES or "://" in str(path) or str(path).startswith("registry:"):
        return
    file = Path(path)
    if not file.exists():
        raise ValueError(f"{name}: {path} does not exist")
    if file.is_dir():
        return
    if file.stat().st_size == 0:
        raise ValueError(f"{name}: {path} is empty (0 bytes): not a checkpoint")
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive whose directory is at the end of the file
        raise ValueError(f"{name}: {path} is not a readable checkpoint (truncated, or not a file written by torch.save)")


def check_file_path(name: str, path: str | None, example: str = "file") -> None:
    """A path a file can be created at: not an existing folder (sqlite and open() would fail without naming it)."""
    if path is not None and Path(path).is_dir():
        raise ValueError(f"{name}: {path} is a folder; give a file path, e.g. {Path(path) / example}")


def _no_cuda() -> str:
    """Why torch sees no CUDA device here, for the error."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but finds no device or driver"


def check_device(name: str, value) -> None:
    """A torch device this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``), named in the error: torch's own
    (``Torch not compiled with CUDA enabled``) comes once a model is loaded and names no option."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name}: expected a device (cpu, cuda, cuda:N, mps); got {value!r}") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}: {value} needs a CUDA GPU and this machine has none that torch can use "
                             f"({_no_cuda()}); set {name} to cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name}: {value}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: mps needs Apple's Metal backend, which torch does not find here; set {name} to cpu")


def check_accelerator(name: str, value) -> None:
    """Lightning's ``accelerator`` (``gpu``, ``cuda``, ``mps``) only where torch sees that GPU, named in the error
    (Lightning's own for ``gpu`` is ``No supported gpu backend found!``). Other values are left to Lightning."""
    import torch

    kind = value.lower() if isinstance(value, str) else None
    if kind == "cuda" or (kind == "gpu" and not torch.backends.mps.is_available()):
        if not (torch.cuda.is_available() and torch.cuda.device_count()):
            raise ValueError(f"{name}: {value} needs a GPU and this machine has none that torch can use "
                             f"({_no_cuda()}); set {name} to cpu (or auto)")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: mps needs Apple's Metal backend, which torch does not find here; set {name} to cpu")
