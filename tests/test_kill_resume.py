"""``kill -9`` in the middle of an evaluation: the rerun pays only for verdicts that never reached the cache."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from loopback import Loopback, Reply, longer_is_better

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


def routing_state(path):
    import torch

    state = torch.load(path, weights_only=False, map_location="cpu")
    return next(v for k, v in state["callbacks"].items() if "UncertaintyRouting" in k)


def test_kill_during_rloo_fit_with_calls_in_flight_then_resume_charges_them(tmp_path):
    """The synchronous loop (``reward_pipeline: 0``) killed while the judge server holds a step's 3 calls: they
    were billed and their answers never read. The resumed run charges them (written down before they were sent)
    and asks them again: the ledger equals the server's billing over both processes."""
    import yaml

    config = yaml.safe_load((ROOT / "configs/rloo/debug_tiny.yaml").read_text())
    config["trainer"].update(default_root_dir=str(tmp_path / "run"), max_steps=6, logger=False,
                             enable_progress_bar=False)
    config["trainer"]["callbacks"][0]["init_args"].update(
        judge={"class_path": "lit_route.judges.OpenAICompatibleJudge",
               "init_args": {"model": "judge", "base_url": "URL", "require_key": False,
                             "policy": {"timeout_s": 600, "deadline_s": 1200}}},  # held answers never time out
        cache=str(tmp_path / "cache.sqlite"))
    config["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1, "save_top_k": -1}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def command(url):
        (tmp_path / "rloo.yaml").write_text(yaml.safe_dump(config).replace("base_url: URL", f"base_url: {url}/v1"))
        return [sys.executable, "-m", "lit_route", "rloo", "fit", "--config", str(tmp_path / "rloo.yaml")]

    with Loopback(answer=longer_is_better) as first:
        first.hold(after=12)  # debug_tiny: 2 prompts x 3 pairs a step, half judged: steps 1-4 answered
        proc = subprocess.Popen(command(first.url), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:  # step 5's calls all at the server: the step waits for them, after step 4's checkpoint was written
            assert first.wait_held(3, timeout=300), "step 5's judge calls never reached the server"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        port, billed_first = first.server.server_address[1], first.billed
    assert billed_first == 15 and first.completions == 12
    last = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert routing_state(last)["ledger"]["calls"] == 12
    with Loopback(answer=longer_is_better, port=port) as second:
        resume = subprocess.run([*command(second.url), "--ckpt_path", str(last)], cwd=ROOT, env=env,
                                capture_output=True, timeout=300)
        assert resume.returncode == 0, resume.stderr.decode()[-2000:]
        billed_second = second.billed
    assert billed_second == 3 + 3  # step 5's calls asked again, step 6's
    final = routing_state(tmp_path / "ckpt" / "epoch=0-step=6.ckpt")
    assert final["ledger"]["calls"] == billed_first + billed_second == 21  # before: 18, the 3 held calls unseen
    assert final["pairs_seen"] == 6 * 6
    assert "3 judge requests were in flight when an earlier process stopped" in resume.stderr.decode()


def serve_process(config: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``lit-route serve --config CONFIG`` in its own process (stderr to ``log``); it and its URL once it listens."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LIT_ROUTE_LOG": "INFO"}
    out = open(log, "w")  # noqa: SIM115 - the server writes to it until killed
    proc = subprocess.Popen([sys.executable, "-m", "lit_route", "serve", "--config", str(config)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=out)
    with open(log) as reader:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            line = reader.readline()
            if "listening on " in line:
                return proc, line.rsplit("listening on ", 1)[1].strip()
            if not line:
                time.sleep(0.1)  # nothing written yet: look again
    proc.kill()
    raise AssertionError(f"lit-route serve did not start: {log.read_text()[-2000:]}")


def test_kill_serve_with_calls_in_flight_then_restart_charges_them(tmp_path):
    """``lit-route serve`` killed (``kill -9``) while the judge server holds the 6 calls of a request: the provider
    billed them and their answers are lost. Restarted with the same state file, /stats counts them (written down
    before they were sent), and the trainer's retry of the request pays them again, counted too."""
    import threading

    import requests
    from test_reward_server import EOS, batch_body

    def write_config(url):
        config = tmp_path / "serve.yaml"
        config.write_text(f"""
pm_backbone: {{model_path: "builtin:tiny-llama"}}
judge:
  class_path: lit_route.judges.OpenAICompatibleJudge
  init_args: {{model: judge, base_url: "{url}/v1", require_key: false, policy: {{timeout_s: 600, deadline_s: 1200}}}}
fraction: 1.0
order: fixed
cache: {tmp_path / "cache.sqlite"}
strip: ["{EOS}"]
port: 0
state_file: {tmp_path / "state.json"}
""")
        return config

    with Loopback(answer=longer_is_better) as judge_server:
        config = write_config(judge_server.url)
        proc, url = serve_process(config, tmp_path / "first.log")
        try:
            assert len(requests.post(url, json=batch_body([1]), timeout=120).json()["rewards"]) == 4
            judge_server.hold()
            # the trainer's request: it never gets an answer (the server is killed under it)
            threading.Thread(target=lambda: _post_quietly(url, batch_body([2])), daemon=True).start()
            assert judge_server.wait_held(6, timeout=120), "the request's judge calls never reached the judge"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert judge_server.billed == 12 and judge_server.completions == 6
        judge_server.release()
        proc, url = serve_process(config, tmp_path / "second.log")
        try:
            stats = requests.get(f"{url}/stats", timeout=30).json()
            assert stats["billed"] == judge_server.billed == 12  # before: 6, the held calls were never charged
            requests.post(url, json=batch_body([2]), timeout=120)  # the trainer retries: the 6 calls paid again
            stats = requests.get(f"{url}/stats", timeout=30).json()
        finally:
            proc.kill()
            proc.wait()
        assert stats["billed"] == judge_server.billed == 18
    assert "6 judge requests were in flight when an earlier process stopped" in (tmp_path / "second.log").read_text()


def _post_quietly(url: str, body: dict) -> None:
    import contextlib

    import requests

    with contextlib.suppress(requests.RequestException):  # the server is killed under it
        requests.post(url, json=body, timeout=300)
