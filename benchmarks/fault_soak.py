"""The heavier fault-injection run: evaluation of all 419 LLMBar pairs (both display orders) and an RLOO run,
through loopback OpenAI / Anthropic servers that fail 30% of requests (429 with Retry-After, 529, 500, dropped
connections, timeouts, malformed JSON, truncated and empty answers); then a rerun of the evaluation against a
healthy server on the same cache.

Reports: faults injected, faults survived (the call still produced a verdict), pairs scored, NaN count, and calls
paid twice. Writes benchmarks/results/fault_soak.{json,md}.

    python benchmarks/fault_soak.py
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import lightning as L
import torch
from loopback import Loopback, longer_is_better

from lit_route.callbacks import UncertaintyRouting
from lit_route.data import load_pairs
from lit_route.eval.run import evaluate
from lit_route.judges import CallPolicy
from lit_route.judges.anthropic_judge import AnthropicJudge
from lit_route.judges.openai_judge import OpenAICompatibleJudge
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.policy.data import PromptDataModule
from lit_route.policy.module import RLOOPolicyModule
from lit_route.policy.sampling import GenerationConfig

DATA = ["bundled:llmbar/Natural.json", "bundled:llmbar/Adversarial-Neighbor.json",
        "bundled:llmbar/Adversarial-GPTInst.json", "bundled:llmbar/Adversarial-GPTOut.json",
        "bundled:llmbar/Adversarial-Manual.json"]
POLICY = dict(max_attempts=8, timeout_s=0.3, backoff_base_s=0.01, backoff_max_s=0.1, deadline_s=60, max_concurrency=16)
def main() -> None:
    os.environ.setdefault("OPENAI_API_KEY", "sk-soak")
    os.environ.setdefault("ANTHROPIC_API_KEY", "sk-ant-soak")
    tmp = Path(tempfile.mkdtemp())
    pairs = load_pairs(DATA)
    rng = random.Random(0)
    with open(tmp / "scores.jsonl", "w") as fh:
        for p in pairs:
            fh.write(json.dumps({"id": p.id, "score": rng.uniform(-1, 1), "uncertainty": 1 + rng.random()}) + "\n")
    cache = str(tmp / "cache.sqlite")
    with Loopback(fault_rate=0.3, seed=0, timeout_delay_s=0.6, answer=longer_is_better) as server:
        judge = OpenAICompatibleJudge("m", base_url=f"{server.url}/v1", policy=CallPolicy(**POLICY))
        first = evaluate(DATA, judge, scores=str(tmp / "scores.jsonl"), output_dir=str(tmp / "a"), cache=cache)
        eval_requests, eval_injected = len(server.requests), dict(server.injected)
    seen = {json.dumps(r["body"]["messages"]) for r in server.requests}
    with Loopback(answer=longer_is_better) as healthy:
        judge = OpenAICompatibleJudge("m", base_url=f"{healthy.url}/v1", policy=CallPolicy(**POLICY))
        second = evaluate(DATA, judge, scores=str(tmp / "scores.jsonl"), output_dir=str(tmp / "b"), cache=cache)
        rerun_requests = [json.dumps(r["body"]["messages"]) for r in healthy.requests]
    calls = 2 * len(pairs)
    failed_first = first["judge_stats"]["failed"]
    # a request repeated on the rerun is paid twice only if its first verdict had succeeded (it was cached)
    paid_twice = len(rerun_requests) - failed_first
    curves = [v for c in (first, second) for curve in c["curves"].values() for v in curve]

    L.seed_everything(0)
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(f"Explain idea number {i} briefly." for i in range(40)))
    with Loopback(fault_rate=0.3, seed=1, timeout_delay_s=0.6, answer=longer_is_better) as server:
        judge = AnthropicJudge("claude-soak", base_url=server.url, policy=CallPolicy(**{**POLICY, "max_attempts": 3}))
        cb = UncertaintyRouting(judge, fraction=0.5)
        module = RLOOPolicyModule(policy=BackboneSpec(), lora=LoraSpec(r=4, alpha=8), pm_backbone=BackboneSpec(),
                                  generation=GenerationConfig(num_samples=4, max_new_tokens=8))
        history = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, *args):
                history.append(dict(pl_module.last_step))

        trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, Record()])
        trainer.fit(module, PromptDataModule(prompts=str(prompts), batch_size=2))
        rloo_injected = dict(server.injected)
    rloo_nan = sum(not math.isfinite(v) for row in history for v in row.values())
    rloo_nan += sum(int((~torch.isfinite(p)).sum()) for p in module.policy.parameters())

    result = {
        "evaluate": {
            "requests": eval_requests, "faults_injected": eval_injected, "calls": calls,
            "verdicts_despite_faults": calls - failed_first, "failed_calls": failed_first,
            "failures_by_reason": first["judge_stats"]["failures"], "retries": first["judge_stats"]["retries"],
            "pairs_scored": first["n_pairs"], "pairs_without_verdict_first_run": first["judge_failed_pairs"],
            "pairs_without_verdict_after_rerun": second["judge_failed_pairs"],
            "nan_in_curves": sum(not math.isfinite(v) for v in curves), "rerun_requests": len(rerun_requests),
            "calls_paid_twice": paid_twice, "distinct_first_run_requests": len(seen),
        },
        "rloo": {
            "steps": len(history), "faults_injected": rloo_injected, "pairs_routed": cb.pairs_routed,
            "judge_failures": dict(cb.failures), "nan_count": rloo_nan,
        },
    }
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "fault_soak.json").write_text(json.dumps(result, indent=2))
    e, r = result["evaluate"], result["rloo"]
    md = "\n".join([
        "| run | faults injected | survived (verdict anyway) | pairs scored | NaN | calls paid twice |",
        "|---|---|---|---|---|---|",
        f"| evaluate, 419 pairs x 2 orders | {sum(e['faults_injected'].values())} in {e['requests']} requests | "
        f"{e['verdicts_despite_faults']} of {e['calls']} calls ({e['failed_calls']} failed: {e['failures_by_reason']}) | "
        f"{e['pairs_scored']} of 419 ({e['pairs_without_verdict_first_run']} kept the PM answer; 0 after the rerun: "
        f"{e['pairs_without_verdict_after_rerun']}) | {e['nan_in_curves']} | {e['calls_paid_twice']} |",
        f"| RLOO, {r['steps']} steps | {sum(r['faults_injected'].values())} | {r['pairs_routed'] - sum(r['judge_failures'].values())} "
        f"of {r['pairs_routed']} routed pairs ({r['judge_failures']}) | all ({r['pairs_routed']} routed) | {r['nan_count']} | n/a |",
    ])
    (out / "fault_soak.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
