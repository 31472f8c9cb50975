"""The GPU check (benchmarks/gpu_check.sh): its CPU dry run end to end, how it records stages that fail or hang,
its option errors, and the RLOO phase timer it reads stage times from."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lit_route.policy import context
from lit_route.policy.context import RewardContext

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def gpu_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def numbers(*values) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def test_dry_run_reports_every_stage_with_numbers(tmp_path):
    out = tmp_path / "report" / "gpu_check.json"
    committed = ROOT / "benchmarks" / "results" / "gpu_check.json"
    before = committed.read_bytes() if committed.exists() else None
    proc = gpu_check("--dry-run", "--output", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["all_ok"] is True
    assert set(result["stages"]) == {"pm_step", "rloo_step", "bf16_checks"}
    assert all(s["status"] == "ok" for s in result["stages"].values())
    # the GPU image has torch, lightning, transformers and peft only: no stage imports lit_route's other needs
    assert all(s["extras_imported"] == [] for s in result["stages"].values())
    pm = result["stages"]["pm_step"]
    assert numbers(pm["median_step_s"], pm["tokens_per_s"], pm["mfu"], pm["hfu"], pm["peak_memory_gib"],
                   pm["finalize_s"], pm["model_flops_per_token"], pm["peak_tflops"], *pm["losses"])
    assert pm["adapter_dtypes"] == ["torch.float32"] and pm["precision_dtype"] == "torch.float64"
    rloo = result["stages"]["rloo_step"]
    assert set(rloo["stage_s"]) == {"generation", "pm_scoring", "reference_logprobs", "update"}
    assert numbers(*rloo["stage_s"].values(), rloo["median_step_s"], rloo["generation_tokens_per_s"],
                   rloo["peak_memory_gib"], rloo["write_model_s"], rloo["load_s"])
    bf16 = result["stages"]["bf16_checks"]
    assert all(v["ok"] and numbers(v["measured"]) for v in bf16["agreement"].values())
    for run in bf16["covariance"].values():
        assert run["ok"] and run["dtype"] == "torch.float64" and run["min_eigenvalue"] > 0
    assert bf16["training"]["decreasing"] and numbers(*bf16["training"]["losses"])
    # goals are not judged on a CPU; their numbers are there
    assert all(g["met"] is None for g in result["goals"].values())
    assert numbers(result["goals"]["mfu"]["measured"], result["goals"]["pm_peak_memory_gib"]["measured"])
    md = out.with_suffix(".md").read_text()
    assert "| pm_step | ok |" in md and "| rloo_step | ok |" in md and "| bf16_checks | ok |" in md
    assert (committed.read_bytes() if committed.exists() else None) == before


FAKE_STAGES = {
    "fails.py": "raise SystemExit('the stage broke')",
    "hangs.py": "import threading\nthreading.Event().wait()",
    "works.py": """
        import json, sys
        path = sys.argv[sys.argv.index('--json') + 1]
        json.dump({'stage': 'bf16_checks', 'status': 'ok', 'device': 'fake',
                   'checks': {'a': True}}, open(path, 'w'))
    """,
}


def test_a_failing_or_hanging_stage_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    """A stage that exits with an error, one that never ends (killed at its timeout) and one that works: all
    three are in the report with how they ended, and the check exits 1."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check as driver

    for name, code in FAKE_STAGES.items():
        (tmp_path / name).write_text(textwrap.dedent(code))
    monkeypatch.setattr(driver, "STAGES", {"pm_step": (str(tmp_path / "fails.py"), 60),
                                           "rloo_step": (str(tmp_path / "hangs.py"), 1),
                                           "bf16_checks": (str(tmp_path / "works.py"), 60)})
    out = tmp_path / "gpu_check.json"
    assert driver.main(["--dry-run", "--output", str(out), "--work", str(tmp_path / "work")]) == 1
    result = json.loads(out.read_text())
    stages = result["stages"]
    assert stages["pm_step"]["status"] == "failed" and stages["pm_step"]["returncode"] == 1
    assert "the stage broke" in "\n".join(stages["pm_step"]["output_tail"])
    assert stages["rloo_step"]["status"] == "timeout" and "timeout of 1 s" in stages["rloo_step"]["error"]
    assert stages["bf16_checks"]["status"] == "ok" and result["checks"]["bf16_checks.a"] is True
    assert result["checks"]["pm_step.ran"] is False and result["all_ok"] is False
    assert "| rloo_step | timeout |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["--dry-run", "--output", "benchmarks/results/gpu_check.json"], "does not write over the committed"),
    (["--dry-run", "--timeout", "nope=3"], "unknown stage 'nope'"),
    (["--dry-run", "--timeout", "pm_step=soon"], "expected STAGE=SECONDS"),
    (["--dry-run", "--stages", "pm_step", "judge"], "unknown stage 'judge'"),
])
def test_bad_options_get_one_line(args, message):
    proc = gpu_check(*args, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_phase_timer_waits_for_queued_gpu_work(monkeypatch):
    """CUDA kernels run asynchronously: a phase must be charged for the kernels it queued, not the previous
    phase's. A fake clock and a fake device queue stand in for the GPU: 2 s left queued by the previous phase,
    then a phase that spends 0.5 s in Python and queues 3 s of kernels."""
    clock, queued = [0.0], [2.0]

    def synchronize(device=None):
        clock[0] += queued[0]
        queued[0] = 0.0

    monkeypatch.setattr(context.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    ctx = RewardContext([], [], *(torch.empty(0) for _ in range(4)))
    with ctx.timer("update"):
        clock[0] += 0.5
        queued[0] += 3.0
    assert ctx.timings["update"] == pytest.approx(3.5)


def test_phase_timer_leaves_cpu_runs_alone(monkeypatch):
    def synchronize(device=None):
        raise AssertionError("synchronised without CUDA")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    ctx = RewardContext([], [], *(torch.empty(0) for _ in range(4)))
    with ctx.timer("generation"):
        pass
    assert ctx.timings["generation"] >= 0.0
