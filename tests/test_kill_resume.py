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
            "--pm_ckpt", "null", "--scores", str(tmp / "scores.jsonl"), "--data", "[bundled:llmbar/Adversarial-GPTOut.json]",
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
    # the same base_url (part of the cache key), a new server
    with Loopback(Reply("<verdict>A</verdict>"), port=slow.server.server_address[1]) as fresh:
        assert run_evaluate(fresh.url, tmp_path, "second").wait(timeout=120) == 0
        assert len(fresh.requests) == total - cached  # only what never reached the cache
    results = json.loads((tmp_path / "second" / "results.json").read_text())
    assert results["judge_stats"]["cached"] == cached and results["judge_failed_pairs"] == 0


def test_kill_during_rloo_fit_then_resume_keeps_the_ledger(tmp_path):
    import torch
    import yaml

    config = yaml.safe_load((ROOT / "configs/rloo/debug_tiny.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    config["trainer"]["max_steps"] = 6
    config["trainer"]["logger"] = False
    config["trainer"]["enable_progress_bar"] = False
    config["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1, "save_top_k": -1}})
    (tmp_path / "rloo.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "lit_route", "rloo", "fit", "--config", str(tmp_path / "rloo.yaml")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((tmp_path / "ckpt").glob("*.ckpt"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    assert saved, "no checkpoint before the kill"
    last = saved[-1]
    step = int(last.stem.split("step=")[1])
    assert step < 6
    state = torch.load(last, weights_only=False)
    routing = next(v for k, v in state["callbacks"].items() if "UncertaintyRouting" in k)
    # debug_tiny: 2 prompts x 3 pairs per step, half judged -> 3 calls per step
    assert routing["ledger"]["calls"] == 3 * step
    resume = subprocess.run([*cmd, "--ckpt_path", str(last)], cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert resume.returncode == 0, resume.stderr.decode()[-2000:]
    final = max((tmp_path / "ckpt").glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    routing = next(v for k, v in torch.load(final, weights_only=False)["callbacks"].items() if "UncertaintyRouting" in k)
    assert routing["ledger"]["calls"] == 3 * 6 and routing["pairs_seen"] == 6 * 6
