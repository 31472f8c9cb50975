"""`make demo` stopped by a signal: a non-zero exit that says where it stopped and how to continue."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_demo_stopped_during_training_says_where_and_exits_non_zero(sig, tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [sys.executable, "-m", "lit_route.demo", "--constraints-pm-config", "configs/pm/debug_tiny.yaml",
            "--llmbar-pm-config", "configs/pm/debug_tiny.yaml", "--rloo-config", "configs/rloo/debug_tiny.yaml", "--out", "runs/demo", "--limit-per-file", "5"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, deadline = b"", time.monotonic() + 240
    while b"Epoch 0:" not in seen and proc.poll() is None and time.monotonic() < deadline:
        seen += os.read(proc.stdout.fileno(), 4096)  # the training bar: the signal lands inside Lightning's fit
    assert b"Epoch 0:" in seen, seen.decode(errors="replace")[-2000:]
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    text = (seen + rest).decode(errors="replace")
    # before: SIGTERM inside fit ended the demo with status 0 and nothing said; SIGINT with Lightning's status 1
    assert proc.returncode == 128 + sig, text[-2000:]
    assert f"demo: stopped by {sig.name} during stage '1. Constraints PM" in text
    assert "again to continue" in text and "Traceback" not in text
    assert not (tmp_path / "runs" / "demo" / "summary.json").exists()
