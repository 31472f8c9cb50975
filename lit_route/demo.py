"""The main job, offline, on a real small model (``make demo`` / ``python -m lit_route.demo``).

1. trains an SNGP preference model on SmolLM2-135M-Instruct (LoRA) with bundled real preference data;
2. finalises the GP covariance (one pass over the training pairs);
3. evaluates uncertainty routing on the bundled LLMBar sets with recorded GPT-4 verdicts, and again with a
   weaker recorded judge (LLaMA2), reusing the PM scores;
4. runs a short RLOO with the routing callback: SmolLM2 policy (LoRA), the PM from step 1 as the reward,
   SmolLM2 as a local judge;
5. prints a summary and where every artefact was written.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

LLMBAR_EVAL = [
    "bundled:llmbar/Natural.json",
    "bundled:llmbar/Adversarial-Neighbor.json",
    "bundled:llmbar/Adversarial-GPTInst.json",
    "bundled:llmbar/Adversarial-GPTOut.json",
    "bundled:llmbar/Adversarial-Manual.json",
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--pm-config", default="configs/pm/smollm2_sngp.yaml")
    parser.add_argument("--rloo-config", default="configs/rloo/smollm2_local.yaml")
    parser.add_argument("--rloo-steps", type=int, default=8)
    parser.add_argument("--limit-per-file", type=int, default=None, help="evaluate at most N pairs per LLMBar file")
    args = parser.parse_args(argv)

    from lit_route.cli import _setup_logging, pm_cli, rloo_cli
    from lit_route.eval.run import evaluate
    from lit_route.judges.replay import ReplayJudge

    _setup_logging()
    out = Path(args.out)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    print("\n== 1-2. SNGP preference model on SmolLM2-135M-Instruct (LoRA), then the covariance pass ==", flush=True)
    t = time.perf_counter()
    cli = pm_cli(["fit", "--config", args.pm_config, "--trainer.default_root_dir", str(out / "pm")])
    timings["pm_fit_and_finalize_s"] = time.perf_counter() - t
    finalize = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FinalizeCovariance")
    ckpt = finalize.ckpt_path
    val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}

    print("\n== 3. Routing on LLMBar (419 pairs) with GPT-4's recorded verdicts ==", flush=True)
    t = time.perf_counter()
    gpt4 = evaluate(LLMBAR_EVAL, ReplayJudge(judge="GPT-4"), pm_ckpt=ckpt, output_dir=str(out / "eval_gpt4"),
                    cache=None, limit_per_file=args.limit_per_file)
    timings["evaluate_gpt4_s"] = time.perf_counter() - t

    print("\n== 3b. The same PM scores with a weaker recorded judge (LLaMA2) ==", flush=True)
    t = time.perf_counter()
    llama2 = evaluate(LLMBAR_EVAL, ReplayJudge(judge="LLaMA2"), scores=str(out / "eval_gpt4" / "scores.jsonl"),
                      output_dir=str(out / "eval_llama2"), cache=None, limit_per_file=args.limit_per_file)
    timings["evaluate_llama2_s"] = time.perf_counter() - t

    print("\n== 4. RLOO with uncertainty routing to a local judge ==", flush=True)
    t = time.perf_counter()
    rloo = rloo_cli(["fit", "--config", args.rloo_config, "--model.pm_ckpt", ckpt,
                     "--trainer.default_root_dir", str(out / "rloo"), "--trainer.max_steps", str(args.rloo_steps)])
    timings["rloo_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    rloo_log = _rloo_history(Path(rloo.trainer.logger.log_dir) / "metrics.csv")
    routing = next(cb for cb in rloo.trainer.callbacks if type(cb).__name__ == "UncertaintyRouting")

    def at(results: dict, router: str, f: float) -> float:
        return results["curves"][router][results["fractions"].index(f)]

    summary = {
        "pm_checkpoint": ckpt,
        "pm_validation": val,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "llmbar": {
            name: {
                "pm_accuracy": r["pm_accuracy"],
                "judge_accuracy": r["judge_accuracy"],
                "auroc_uncertainty": r["metrics"]["auroc_uncertainty"],
                "ece": r["metrics"]["ece"],
                **{f"{router}@{int(f * 100)}%": at(r, router, f) for f in (0.1, 0.25, 0.5)
                   for router in ("uncertainty", "random", "margin", "oracle")},
            }
            for name, r in (("gpt4", gpt4), ("llama2", llama2))
        },
        "rloo": {
            "steps": len(rloo_log),
            "routed_pairs": routing.pairs_routed,
            "pairs_seen": routing.pairs_seen,
            "judge_failures": dict(routing.failures),
            "mean_step_split_s": {k: round(sum(r[k] for r in rloo_log) / len(rloo_log), 2)
                                  for k in rloo_log[0] if k.startswith("time/")} if rloo_log else {},
            "kl_by_step": [float(f"{r.get('kl/mean', 0.0):.3g}") for r in rloo_log],
            "reward_std_by_step": [round(r.get("reward/std", 0.0), 4) for r in rloo_log],
        },
        "artefacts": {
            "pm_checkpoint": ckpt,
            "pm_logs": str(out / "pm"),
            "gpt4_results": str(out / "eval_gpt4" / "results.json"),
            "gpt4_plot": str(out / "eval_gpt4" / "routing_curve.png"),
            "llama2_results": str(out / "eval_llama2" / "results.json"),
            "llama2_plot": str(out / "eval_llama2" / "routing_curve.png"),
            "rloo_metrics": str(Path(rloo.trainer.logger.log_dir) / "metrics.csv"),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n== Summary ==")
    print(json.dumps(summary, indent=2))
    print(f"\nsummary: {out / 'summary.json'}   total {timings['total_s'] / 60:.1f} min")
    return summary


def _rloo_history(path: Path) -> list[dict[str, float]]:
    import csv

    if not path.exists():
        return []
    with open(path) as fh:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
    return [r for r in rows if "time/update" in r]


if __name__ == "__main__":
    main()
