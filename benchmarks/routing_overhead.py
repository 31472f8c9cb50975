"""Router + ledger + bookkeeping per RLOO step, against the step itself.

Times ``UncertaintyRouting``'s two hooks on a step's score matrices with an instant judge (recorded verdicts, so
no judge time is counted), for several group sizes, and divides by the measured RLOO step time
(``results/rloo_vs_trl.json``, or ``--step-seconds``).

    python benchmarks/routing_overhead.py

Writes benchmarks/results/routing_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from lit_route.callbacks import UncertaintyRouting
from lit_route.judges import ReplayJudge
from lit_route.policy.context import RewardContext
from lit_route.rewards.pairwise import score_matrix


def one_step(cb, b: int, k: int, step: int) -> float:
    p, u = torch.randn(b, k, k), 1 + torch.rand(b, k, k)
    s, uu = score_matrix(p, u)
    ctx = RewardContext([[{"role": "user", "content": f"prompt {i}"}] for i in range(b)],
                        [[f"completion {i}-{j}" for j in range(k)] for i in range(b)], s, uu, s.clone(),
                        torch.zeros_like(s, dtype=torch.bool))
    trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=step, strategy=None)
    start = time.perf_counter()
    cb.on_pairwise_scores(trainer, None, ctx)
    cb.on_before_rewards(trainer, None, ctx)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--step-seconds", type=float, default=None)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out = Path(args.out)
    step_s = args.step_seconds
    if step_s is None:
        step_s = json.loads((out / "rloo_vs_trl.json").read_text())["lit_route"]["median_step_s"]
    judge = ReplayJudge()  # nothing matches generated text: every routed pair fails instantly (still bookkept)
    rows = []
    for b, k in ((2, 4), (8, 4), (8, 8), (32, 8)):
        cb = UncertaintyRouting(judge, fraction=0.25)
        times = [one_step(cb, b, k, i) for i in range(30)]
        rows.append({"prompts": b, "k": k, "pairs": b * k * (k - 1) // 2, "median_s": statistics.median(times[3:]),
                     "over_step": statistics.median(times[3:]) / step_s})
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing_overhead.json").write_text(json.dumps({"step_seconds": step_s, "rows": rows}, indent=2))
    lines = [f"| prompts x K | pairs | routing + ledger + bookkeeping | / RLOO step ({step_s:.2f} s) | goal |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['prompts']} x {r['k']} | {r['pairs']} | {r['median_s'] * 1e3:.2f} ms | {100 * r['over_step']:.3f}% | <= 1% |"
              for r in rows]
    (out / "routing_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
