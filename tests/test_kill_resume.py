"""``kill -9`` in the middle of an evaluation: the rerun pays only for verdicts that never reached the cache."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from loopback import Loopback, Reply

from lit_route.data import load_pairs

ROOT = Path(__file__).resolve().parents[1]


def run_evaluate(url: str, tmp: Path, out: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "lit_route", "evaluate", "--config", "configs/eval/rmbench.yaml",
            "--pm", "null", "--scores", str(tmp / "scores.jsonl"), "--data", "[bundled:llmbar/Adversarial-GPTOut.json]",
            "--output_dir", str(tmp / out), "--cache", str(tmp / "cache.sqlite"),
            "--judge.init_args.base_url", f"{url}/v1", "--judge.init_args.policy.max_concurrency", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_kill_during_evaluate_then_rerun_pays_nothing_twice(tmp_path):
    pairs = load_pairs("bundled:llmbar/Adversarial-GPTOut.json")
    (tmp_path / "scores.jsonl").write_text("".join(
        json.dumps({"id": p.id, "score": 0.1, "uncertainty": 1.0 + i / 100}) + "\n" for i, p in enumerate(pairs)))
    total = 2 * len(pairs)  # both display orders
    with Loopback(Reply("<verdict>A</verdict>", delay_s=0.05)) as slow:
        proc = run_evaluate(slow.url, tmp_path, "first")
        deadline = time.time() + 60
        while len(slow.requests) < total // 3 and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        first_requests = len(slow.requests)
    assert 0 < first_requests < total
    cached = sqlite3.connect(tmp_path / "cache.sqlite").execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
    assert cached > 0
    with Loopback(Reply("<verdict>A</verdict>")) as fresh:
        assert run_evaluate(fresh.url, tmp_path, "second").wait(timeout=120) == 0
        assert len(fresh.requests) == total - cached  # only what never reached the cache
    results = json.loads((tmp_path / "second" / "results.json").read_text())
    assert results["judge_stats"]["cached"] == cached and results["judge_failed_pairs"] == 0
