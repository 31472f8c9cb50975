"""The GPU check: the project's GPU measurements and bf16-mixed checks on random 8B-shaped models, one command.

    bash benchmarks/gpu_check.sh              # a CUDA machine: writes benchmarks/results/gpu_check.{json,md}
    bash benchmarks/gpu_check.sh --dry-run    # tiny shapes on the CPU, into a temporary folder (or --output)

Each stage runs in its own process under its own timeout; one that fails or runs out of time is recorded (with
what it had measured by then) and the next one runs:

    pm_step      gpu_8b.py          8B-shaped LoRA + SNGP PM training step: peak memory, tokens/s, MFU
    rloo_step    gpu_rloo.py        RLOO steps of an 8B-shaped LoRA policy (HF engine): each stage's seconds
    bf16_checks  gpu_precision.py   bf16-mixed vs float32 scores and GP variances, the float64 covariance pass,
                                    the loss over a few steps

Exit status 0 when every stage ran and every check passed, 1 otherwise (the report is written either way), 2 for
bad options. The goals (PM step peak memory ≤ 24 GiB, MFU ≥ 35%) are reported against, not enforced.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gpu_report import markdown

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results" / "gpu_check.json"
# stage -> (script, timeout in seconds); the timeouts add up to 7.5 min, the whole check's budget on one H100
STAGES = {"pm_step": ("gpu_8b.py", 100), "rloo_step": ("gpu_rloo.py", 260), "bf16_checks": ("gpu_precision.py", 90)}
GOALS = {"pm_peak_memory_gib": 24.0, "mfu": 0.35}
SHM_NEEDED = 24 * 2**30  # the 8B-shaped model folder is 16 GB: room for it and some to spare


class OptionError(ValueError):
    """A bad command-line option: one line, exit status 2."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (the same code, seconds)")
    parser.add_argument("--output", default=None, help="the JSON report (the .md beside it); default "
                        "benchmarks/results/gpu_check.json, or a temporary folder with --dry-run")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), help=f"a subset of {', '.join(STAGES)}")
    parser.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override one stage's timeout (repeatable)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: from the device name)")
    parser.add_argument("--work", default=None, help="where the stages' scratch folders go (default: /dev/shm when "
                        "it has room for the 16 GB model folder, else the temporary folder); removed after each stage")
    args = parser.parse_args(argv)
    for stage in args.stages:
        if stage not in STAGES:
            raise OptionError(f"--stages: unknown stage {stage!r}; expected some of {', '.join(STAGES)}")
    args.timeouts = {name: float(t) for name, (_, t) in STAGES.items()}
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        if name not in STAGES:
            raise OptionError(f"--timeout {item}: unknown stage {name!r}; expected one of {', '.join(STAGES)}")
        try:
            args.timeouts[name] = float(seconds)
        except ValueError:
            raise OptionError(f"--timeout {item}: expected STAGE=SECONDS") from None
        if args.timeouts[name] <= 0:
            raise OptionError(f"--timeout {item}: the timeout must be positive")
    if args.output is None:
        args.output = (Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) / "gpu_check.json") if args.dry_run else RESULTS
    args.output = Path(args.output).resolve()
    if args.dry_run and args.output == RESULTS:
        raise OptionError("--output: a dry run does not write over the committed GPU results; choose another path")
    return args


def stage_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(name, value)
    return env


def has_cuda() -> bool:
    """Whether torch sees a CUDA device, asked in a child process (this one never touches CUDA)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True, env=stage_env(), check=False)
    return out.stdout.strip() == "True"


def scratch_root(work: str | None) -> Path:
    """Where the stages' scratch folders go: ``--work``, else ``/dev/shm`` when it has room for the model folder
    (written and read at memory speed), else the temporary folder."""
    if work is not None:
        Path(work).mkdir(parents=True, exist_ok=True)
        return Path(work).resolve()
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > SHM_NEEDED:
        return shm
    return Path(tempfile.gettempdir())


def run_stage(name: str, args: argparse.Namespace, reports: Path, root: Path) -> dict:
    """Runs one stage's script in its own process group under its timeout, in a scratch folder under ``root``
    that is removed afterwards however the stage ended (a killed stage cleans nothing up itself); returns its
    report, with how it ended (``ok``, ``failed``, ``timeout``), its wall time and, unless it ended ``ok``, its
    output's last lines."""
    scratch = Path(tempfile.mkdtemp(prefix=f"gpu_check_{name}_", dir=root))
    try:
        return _run_stage(name, args, reports / f"{name}.json", scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_stage(name: str, args: argparse.Namespace, stage_json: Path, scratch: Path) -> dict:
    script, _ = STAGES[name]
    cmd = [sys.executable, "-u", str(BENCH / script), "--json", str(stage_json), "--work", str(scratch)]
    if args.dry_run:
        cmd.append("--dry-run")
    if name == "pm_step" and args.peak_tflops is not None:
        cmd += ["--peak_tflops", str(args.peak_tflops)]
    timeout = args.timeouts[name]
    print(f"[gpu_check] {name}: {' '.join(cmd[2:])} (timeout {timeout:g} s)", flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=30)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    reader = threading.Thread(target=_relay, args=(proc.stdout, name, tail), daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc)
    except KeyboardInterrupt:  # the stage runs in its own session: Ctrl-C reaches only this process
        _stop(proc)
        raise
    reader.join(timeout=5)
    wall = time.perf_counter() - start
    try:
        report = json.loads(stage_json.read_text())
    except (OSError, json.JSONDecodeError):
        report = {"stage": name}
    if timed_out:
        report.update(status="timeout", error=f"ran past its timeout of {timeout:g} s (killed)")
    elif proc.returncode != 0 or report.get("status") != "ok":
        report["status"] = "failed"
        report.setdefault("error", f"exit status {proc.returncode}")
    report.update(wall_s=wall, timeout_s=timeout, returncode=proc.returncode)
    if report["status"] != "ok":
        report["output_tail"] = list(tail)
    print(f"[gpu_check] {name}: {report['status']} in {wall:.0f} s", flush=True)
    return report


def _relay(stream, name: str, tail) -> None:
    for line in stream:
        tail.append(line.rstrip("\n"))
        print(f"[{name}] {line}", end="", flush=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group, SIGKILL 10 s later if it is still there."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def evaluate(stages: dict, dry_run: bool) -> tuple[dict, dict]:
    """The goals (``met`` is ``None`` in a dry run or without the number) and every check's outcome."""
    pm = stages.get("pm_step", {})
    goals = {
        "pm_peak_memory_gib": {"target": f"≤ {GOALS['pm_peak_memory_gib']:g}", "measured": pm.get("peak_memory_gib"),
                               "basis": pm.get("memory_basis")},
        "mfu": {"target": f"≥ {GOALS['mfu']:.0%}", "measured": pm.get("mfu"),
                "peak_tflops": pm.get("peak_tflops"), "basis": pm.get("peak_tflops_source")},
    }
    for name, goal in goals.items():
        value = goal["measured"]
        if dry_run or value is None:
            goal["met"] = None
        else:
            goal["met"] = value <= GOALS[name] if name == "pm_peak_memory_gib" else value >= GOALS[name]
    checks = {f"{name}.ran": stage.get("status") == "ok" for name, stage in stages.items()}
    if "pm_step" in stages:
        checks["pm_step.loss_finite"] = bool(pm.get("losses_finite"))
        checks["pm_step.precision_float64"] = pm.get("precision_dtype") == "torch.float64"
    if "rloo_step" in stages:
        checks["rloo_step.finite"] = bool(stages["rloo_step"].get("finite"))
    if "bf16_checks" in stages:
        own = stages["bf16_checks"].get("checks") or {"all": False}
        checks.update({f"bf16_checks.{k}": bool(v) for k, v in own.items()})
    return goals, checks


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except OptionError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    if not args.dry_run and not has_cuda():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    root = scratch_root(args.work)
    start = time.perf_counter()
    stages: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_reports_") as reports:
        for name in args.stages:
            try:
                stages[name] = run_stage(name, args, Path(reports), root)
            except KeyboardInterrupt:
                print(f"gpu_check: stopped during stage {name}; no report written", file=sys.stderr)
                return 130
    goals, checks = evaluate(stages, args.dry_run)
    device = next((s["device"] for s in stages.values() if s.get("device")), None)
    result = {
        "dry_run": args.dry_run, "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - start, "goals": goals, "checks": checks,
        "all_ok": all(checks.values()), "stages": stages,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    args.output.with_suffix(".md").write_text(md)
    print(md)
    print(f"[gpu_check] wrote {args.output} and {args.output.with_suffix('.md').name}", flush=True)
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
