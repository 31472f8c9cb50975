"""Each verdict is paid for once: within a run (one call per key in flight) and across processes sharing a cache
(a leased claim), through the real SDK against a keep-alive loopback server."""

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from loopback import Loopback, Reply

from lit_route.judges import CachedJudge, CallPolicy, judge_pairs, run_sync
from lit_route.judges.openai_judge import OpenAICompatibleJudge
from lit_route.types import JudgeRequest, Preference

ROOT = Path(__file__).resolve().parents[1]
POLICY = dict(max_attempts=3, timeout_s=10.0, backoff_base_s=0.01, backoff_max_s=0.1, deadline_s=30)


def judge(url: str) -> OpenAICompatibleJudge:
    return OpenAICompatibleJudge("judge", base_url=f"{url}/v1", require_key=False, policy=CallPolicy(**POLICY))


def write_data(tmp: Path, n: int = 16, repeats: int = 4) -> tuple[Path, Path, int]:
    """``n`` distinct pairs plus ``repeats`` of them again under other ids; returns (data, scores, unique)."""
    rows = [{"id": f"p{i}", "prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad {i}"}
            for i in range(n)]
    rows += [{**rows[i], "id": f"again{i}"} for i in range(repeats)]
    data, scores = tmp / "pairs.jsonl", tmp / "scores.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores.write_text("".join(json.dumps({"id": r["id"], "score": 0.1, "uncertainty": 1.0}) + "\n" for r in rows))
    return data, scores, 2 * n  # both display orders of each distinct pair


def test_the_same_pair_twice_in_one_run_is_billed_once():
    items = [("q", "x", "y"), ("q2", "x2", "y2"), ("q", "x", "y")]
    with Loopback(Reply("<verdict>A</verdict>", delay_s=0.05)) as server:
        backend, answered = judge(server.url), []
        # requests one by one, as `evaluate` sends them for its progress bar; no cache
        out = run_sync(judge_pairs(backend, items, order="both", on_verdict=answered.append))
    assert server.completions == 4 == sum(j.billed for j in out)  # before: 6, the repeated pair paid again
    assert sum(answered) == 6 and [j.score for j in out] == [0.5, 0.5, 0.5] and out[2].billed == 0


def test_a_request_in_flight_is_not_sent_again(tmp_path):
    request = JudgeRequest("q", "x", "y")

    async def twice(cache):  # two callers ask for the same verdict at once (two batches, two steps)
        return await asyncio.gather(cache.judge([request]), cache.judge([request]))

    with Loopback(Reply("<verdict>A</verdict>", delay_s=0.2)) as server:
        cache = CachedJudge(judge(server.url), tmp_path / "cache.sqlite")
        (first,), (second,) = run_sync(twice(cache))
    assert server.completions == 1  # before: 2
    assert first.billed + second.billed == 1 and cache.stats.billed == 1 and cache.stats.cached == 1
    assert first.preference is second.preference is Preference.A


def test_two_evaluate_processes_on_one_cache_pay_each_verdict_once(tmp_path):
    data, scores, unique = write_data(tmp_path)
    # slow enough that the two runs overlap: without claims both pay for (nearly) everything
    with Loopback(Reply("Same quality.\n<verdict>A</verdict>", delay_s=0.3)) as server:
        procs = []
        for name in ("one", "two"):
            config = {"data": [str(data)], "scores": str(scores), "pm_ckpt": None, "order": "both",
                      "cache": str(tmp_path / "cache.sqlite"), "output_dir": str(tmp_path / name), "progress": False,
                      "judge": {"class_path": "lit_route.judges.OpenAICompatibleJudge", "init_args": {
                          "model": "judge", "base_url": f"{server.url}/v1", "require_key": False,
                          "policy": {**POLICY, "max_concurrency": 4}}}}
            (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
            procs.append(subprocess.Popen([sys.executable, "-m", "lit_route", "evaluate", "--config",
                                           str(tmp_path / f"{name}.yaml")], cwd=ROOT, env={**os.environ},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        errors = [p.communicate(timeout=300)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errors
        billed = server.completions
    stats = [json.loads((tmp_path / n / "results.json").read_text())["judge_stats"] for n in ("one", "two")]
    # before: 80 billed by the server (each run paid all 40 requests, its repeated pairs too)
    assert billed == unique == sum(s["billed"] for s in stats)
    assert all(s["billed"] + s["cached"] == 32 for s in stats)  # 16 distinct pairs x 2 orders each
    db = sqlite3.connect(tmp_path / "cache.sqlite")
    assert db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == unique
    assert db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0  # every claim released
    assert db.execute("SELECT SUM(billed) FROM spend").fetchone()[0] == unique


def test_a_live_claim_is_waited_for_and_an_expired_one_taken_over(tmp_path):
    request = JudgeRequest("q", "x", "y")
    db = tmp_path / "cache.sqlite"
    with Loopback(Reply("<verdict>B</verdict>")) as server:
        cache = CachedJudge(judge(server.url), db, lease_s=30)
        key = cache.key(request)
        other = sqlite3.connect(db, isolation_level=None)
        # another process holds a live claim, then stores its verdict: we wait and pay nothing
        other.execute("INSERT INTO claims VALUES (?, 'other', ?)", (key, time.time() + 60))
        row = json.dumps({"preference": "A", "raw": "<verdict>A</verdict>"})

        def answer_later():  # the other process, on its own connection
            time.sleep(0.3)
            other = sqlite3.connect(db, isolation_level=None)
            other.execute("INSERT INTO verdicts VALUES (?, ?)", (key, row))
            other.execute("DELETE FROM claims WHERE key = ?", (key,))

        thread = threading.Thread(target=answer_later)
        thread.start()
        (waited,) = run_sync(cache.judge([request]))
        thread.join()
        assert waited.preference is Preference.A and waited.cached and server.completions == 0
        # a claim whose lease ran out (its owner was killed): taken over, paid once
        fresh = JudgeRequest("q2", "x", "y")
        other.execute("INSERT INTO claims VALUES (?, 'killed', ?)", (cache.key(fresh), time.time() - 1))
        (taken,) = run_sync(cache.judge([fresh]))
        assert taken.preference is Preference.B and server.completions == 1
        assert other.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0


def test_the_cache_keeps_the_final_line_and_a_hash_unless_asked_for_the_full_text(tmp_path):
    long_answer = "reasoning " * 100_000 + "\nFinal verdict: <verdict>A</verdict>"  # ~1 MB
    with Loopback(Reply(long_answer)) as server:
        small = CachedJudge(judge(server.url), tmp_path / "small.sqlite")
        (v,) = run_sync(small.judge([JudgeRequest("q", "x", "y")]))
        full = CachedJudge(judge(server.url), tmp_path / "full.sqlite", store_text="full")
        run_sync(full.judge([JudgeRequest("q", "x", "y")]))
        (again,) = run_sync(CachedJudge(judge(server.url), tmp_path / "small.sqlite").judge([JudgeRequest("q", "x", "y")]))
    assert again.cached and again.preference is Preference.A and server.completions == 2
    assert v.raw == long_answer  # the caller still sees the whole answer
    (blob,) = sqlite3.connect(tmp_path / "small.sqlite").execute("SELECT verdict FROM verdicts").fetchone()
    assert len(blob) < 2_000  # before: ~1 MB per row
    row = json.loads(blob)
    assert row["raw"] == "Final verdict: <verdict>A</verdict>" and len(row["raw_sha256"]) == 64
    (blob,) = sqlite3.connect(tmp_path / "full.sqlite").execute("SELECT verdict FROM verdicts").fetchone()
    assert json.loads(blob)["raw"] == long_answer


def test_full_text_is_kept_when_the_config_asks_for_it(tmp_path):
    from lit_route.cli import main

    data, scores, unique = write_data(tmp_path, n=2, repeats=0)
    answer = "Reasons, at length.\n" * 50 + "Final verdict: <verdict>A</verdict>"
    with Loopback(Reply(answer)) as server:
        config = {"data": [str(data)], "scores": str(scores), "pm_ckpt": None, "cache": None, "progress": False,
                  "output_dir": str(tmp_path / "out"),
                  "judge": {"class_path": "lit_route.judges.CachedJudge", "init_args": {
                      "path": str(tmp_path / "full.sqlite"), "store_text": "full",
                      "backend": {"class_path": "lit_route.judges.OpenAICompatibleJudge", "init_args": {
                          "model": "judge", "base_url": f"{server.url}/v1", "require_key": False}}}}}
        (tmp_path / "full.yaml").write_text(yaml.safe_dump(config))
        main(["evaluate", "--config", str(tmp_path / "full.yaml")])
    rows = sqlite3.connect(tmp_path / "full.sqlite").execute("SELECT verdict FROM verdicts").fetchall()
    assert len(rows) == unique and all(json.loads(blob)["raw"] == answer for (blob,) in rows)
