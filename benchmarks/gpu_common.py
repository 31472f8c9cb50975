"""What the GPU check's stages share: the device, synchronised timing, peak memory, peak FLOP/s, the stage report.

Every stage runs on CUDA when there is a device and on the CPU in ``--dry-run`` (tiny shapes, the same code).
CUDA kernels run asynchronously, so every timed region is bracketed by :func:`sync`; warm-up steps are run and
left out of every median.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

# Dense bf16 tensor-core peak in TFLOP/s (no sparsity), by the first name fragment found in the device name:
# SXM boards unless the name says PCIe or NVL. GH200 carries the H100/H200 SXM die.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
)
# --dry-run runs on a CPU, which has no tensor-core peak: MFU is computed against this stated nominal figure so
# that the arithmetic runs; the number says nothing about the CPU.
DRY_RUN_PEAK_TFLOPS = 1.0
# lit_route's dependencies that a bare torch + lightning + transformers + peft image lacks: no stage may need them
NOT_ON_GPU_IMAGE = ("datasets", "tenacity", "aiolimiter", "anthropic", "openai", "vllm")


def device(dry_run: bool) -> torch.device:
    """CUDA for the real check, the CPU for the dry run.

    Raises:
        RuntimeError: the real check without a CUDA device.
    """
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run the GPU check on a GPU machine, or pass --dry-run")
    return torch.device("cuda", torch.cuda.current_device())


def sync(dev: torch.device) -> None:
    """Waits for the work queued on ``dev`` (a no-op on the CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev: torch.device, fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds ``fn()`` takes on ``dev``, queued kernels included, and what it returned."""
    sync(dev)
    start = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - start, out


def reset_peak_memory(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory(dev: torch.device) -> dict:
    """The peak since :func:`reset_peak_memory`: allocated and reserved bytes on CUDA, in GiB; on the CPU the
    process's peak resident set (the dry run has no device memory), named in ``basis``."""
    if dev.type == "cuda":
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated(dev) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30,
                "basis": "torch.cuda.max_memory_allocated / max_memory_reserved"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_allocated_gib": rss_kib / 2**20, "peak_reserved_gib": rss_kib / 2**20,
            "basis": "process peak RSS (CPU dry run)"}


def peak_tflops(dev: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """Dense bf16 peak of ``dev`` in TFLOP/s and where the number comes from (``None`` when it is not known)."""
    if override is not None:
        return override, "--peak_tflops"
    if dev.type != "cuda":
        return DRY_RUN_PEAK_TFLOPS, "nominal 1 TFLOP/s (CPU dry run: not a hardware figure)"
    name = torch.cuda.get_device_name(dev)
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment in name:
            return tflops, f"dense bf16 peak of {fragment} (table in benchmarks/gpu_common.py)"
    return None, f"unknown for {name!r}: pass --peak_tflops"


def versions() -> dict:
    """The versions a result depends on (CUDA: the one torch was built with)."""
    import importlib.metadata

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "lightning", "peft"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def stage_parser(doc: str) -> argparse.ArgumentParser:
    """The options every stage script takes (the driver passes them)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (checks the code, in seconds)")
    parser.add_argument("--json", required=True, help="where the stage writes its result (rewritten as it goes)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    return parser


class StageReport(dict):
    """A stage's result, written to its JSON file on every :meth:`update`, so that a stage killed by its
    timeout still leaves what it measured up to then."""

    def __init__(self, path: str | Path, stage: str, dry_run: bool):
        super().__init__(stage=stage, dry_run=dry_run, status="running")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=2, default=_plain))
        tmp.replace(self.path)


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, torch.device | torch.dtype | Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def run_stage(stage: str, doc: str, body: Callable[[argparse.Namespace, StageReport], None],
              add_options: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parses the stage options, runs ``body(args, report)`` and records how it ended: ``ok``, or ``failed``
    with the error and the traceback's last lines (exit status 1)."""
    parser = stage_parser(doc)
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args()
    report = StageReport(args.json, stage, args.dry_run)
    report.update(versions=versions())
    try:
        body(args, report)
    except Exception as err:
        report.update(status="failed", error=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc().splitlines()[-12:])
        print(f"{stage}: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    report.update(status="ok", extras_imported=sorted(m for m in NOT_ON_GPU_IMAGE if m in sys.modules))
