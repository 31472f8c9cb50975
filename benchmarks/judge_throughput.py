"""Judge client throughput against loopback OpenAI- and Anthropic-compatible servers with 1–5 s latency.

1. Achieved calls per minute / the configured RPM cap (steady state: request arrivals at the server).
2. The RLOO step's stall on the judge when the routed pairs fit in the RPM window: the judge runs while the
   reference log-probabilities are computed, so the stall should not exceed the slowest call.

    python benchmarks/judge_throughput.py [--calls 300 --rpm 600]

Writes benchmarks/results/judge_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from loopback import Loopback, Reply

from lit_route.judges import CallPolicy, run_sync
from lit_route.judges.anthropic_judge import AnthropicJudge
from lit_route.judges.openai_judge import OpenAICompatibleJudge
from lit_route.types import JudgeRequest


def slow_answer(rng: random.Random, lo: float, hi: float):
    def answer(body):
        return Reply("<verdict>A</verdict>", delay_s=rng.uniform(lo, hi))

    return answer


def throughput(kind: str, calls: int, rpm: float, lo: float, hi: float) -> dict:
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    os.environ.setdefault("ANTHROPIC_API_KEY", "sk-ant-bench")
    policy = CallPolicy(max_concurrency=128, requests_per_minute=rpm, timeout_s=30)
    with Loopback(answer=slow_answer(random.Random(0), lo, hi)) as server:
        arrivals = []
        original = server.answer

        def stamped(body):
            arrivals.append(time.perf_counter())
            return original(body)

        server.answer = stamped
        judge = (OpenAICompatibleJudge("m", base_url=f"{server.url}/v1", policy=policy) if kind == "openai"
                 else AnthropicJudge("claude-bench", base_url=server.url, policy=policy))
        requests = [JudgeRequest(f"prompt {i}", "a", "b") for i in range(calls)]
        start = time.perf_counter()
        verdicts = run_sync(judge.judge(requests))
        elapsed = time.perf_counter() - start
    arrivals.sort()
    burst = int(max(1.0, rpm / 60.0))  # the limiter's initial bucket
    steady = arrivals[burst:]
    achieved = (len(steady) - 1) / (steady[-1] - steady[0]) * 60.0
    return {
        "backend": kind, "calls": calls, "rpm": rpm, "latency_s": [lo, hi],
        "ok": sum(v.ok for v in verdicts), "elapsed_s": elapsed,
        "achieved_rpm": achieved, "achieved_over_rpm": achieved / rpm,
    }


def stall(steps: int, routed: int, ref_seconds: float, lo: float, hi: float) -> dict:
    """Overlap of judge calls with a reference pass of ``ref_seconds`` (modelled as a busy wait on this thread)."""
    from concurrent.futures import ThreadPoolExecutor

    from lit_route.judges import judge_pairs

    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    rows = []
    with Loopback(answer=slow_answer(random.Random(1), lo, hi)) as server, ThreadPoolExecutor(1) as pool:
        judge = OpenAICompatibleJudge("m", base_url=f"{server.url}/v1", policy=CallPolicy(max_concurrency=64))
        for step in range(steps):
            items = [(f"s{step} p{i}", "x", "y") for i in range(routed)]
            t0 = time.perf_counter()
            future = pool.submit(run_sync, judge_pairs(judge, items, order="random", seed=step))
            while time.perf_counter() - t0 < ref_seconds:  # the reference log-prob pass
                pass
            t1 = time.perf_counter()
            judged = future.result()
            t2 = time.perf_counter()
            rows.append({"stall_s": t2 - t1, "slowest_call_s": max(j.latency_s for j in judged), "judge_s": t2 - t0})
    return {
        "steps": steps, "routed_per_step": routed, "reference_s": ref_seconds,
        "median_stall_s": statistics.median(r["stall_s"] for r in rows),
        "median_slowest_call_s": statistics.median(r["slowest_call_s"] for r in rows),
        "stall_over_slowest_call": statistics.median(r["stall_s"] / r["slowest_call_s"] for r in rows),
        "stall_over_judge_time": statistics.median(r["stall_s"] / r["judge_s"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rpm", type=float, default=600.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = {
        "throughput": [throughput(kind, args.calls, args.rpm, 1.0, 5.0) for kind in ("openai", "anthropic")],
        "stall": stall(steps=5, routed=16, ref_seconds=2.0, lo=1.0, hi=5.0),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "judge_throughput.json").write_text(json.dumps(results, indent=2))
    lines = ["| measure | value | goal |", "|---|---|---|"]
    for t in results["throughput"]:
        lines.append(f"| {t['backend']}: achieved / configured RPM ({t['calls']} calls, cap {t['rpm']:.0f}/min, "
                     f"1-5 s latency) | {t['achieved_over_rpm']:.3f} | >= 0.95 |")
    s = results["stall"]
    lines.append(f"| RLOO stall / slowest call ({s['routed_per_step']} routed pairs, {s['reference_s']:.0f} s reference "
                 f"pass) | {s['stall_over_slowest_call']:.2f} (stall {s['median_stall_s']:.2f} s, slowest "
                 f"{s['median_slowest_call_s']:.2f} s) | <= 1.0 |")
    (out / "judge_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
