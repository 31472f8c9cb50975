"""The main job, offline, on a real small model (``make demo`` / ``python -m lit_route.demo``).

1. trains an uncertainty-aware preference model on frozen SmolLM2-135M-Instruct features with bundled real
   preference data: the backbone reads each pair once (feature cache), the head trains for many epochs;
2. finalises the posterior (one pass over the cached training features);
3. evaluates uncertainty routing on the bundled LLMBar sets with recorded GPT-4 verdicts, and again with a
   weaker recorded judge (LLaMA2), reusing the PM scores, and prints the routing table it measured;
4. runs a short RLOO with the routing callback: SmolLM2 policy (LoRA), the PM from step 1 as the reward,
   SmolLM2 as a local judge;
5. prints a summary and where every artefact was written.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from pathlib import Path

LLMBAR_EVAL = [
    "bundled:llmbar/Natural.json",
    "bundled:llmbar/Adversarial-Neighbor.json",
    "bundled:llmbar/Adversarial-GPTInst.json",
    "bundled:llmbar/Adversarial-GPTOut.json",
    "bundled:llmbar/Adversarial-Manual.json",
]


DEFAULT_PM_CONFIG = "configs/pm/smollm2_frozen_uq.yaml"

# The up-front estimate of the default run. Timed on 2 idle AVX-512 cores before the feature pass read sequences
# in length order: 22.1 min, 17.0 of them in the backbone's pass over 2,130 sequences read as 817,920 padded
# tokens; in length order the pass reads 565,745 (tests/test_feature_pass.py checks the ordering), and its time
# is taken as proportional to the tokens read: 11.8 min. An idle AVX2 CPU ran the old pass at ~70 s per 32-pair
# batch (34 batches: 2.3 times as long), so its pass takes about 27 min, and the other stages at least their 5 min.
ESTIMATE = ("about 17 min on 2 idle cores with AVX-512, at least 32 with AVX2 (about 12 and 27 of them in the "
            "backbone's one pass over 2,130 sequences, 566k tokens; its bar shows the time left)")
ESTIMATE_CACHED = "about 5 min on 2 idle cores (the backbone's features are in the cache)"


class Stopped:
    """Where the run is, and the signal that stopped it (None while it runs)."""

    def __init__(self) -> None:
        self.stage = "starting"
        self.signal: int | None = None

    def enter(self, title: str) -> None:
        self.stage = title
        print(f"\n== {title} ==", flush=True)

    def handler(self, signum, frame) -> None:
        # Lightning turns a KeyboardInterrupt inside fit into a graceful stop and sys.exit(1), and its own SIGTERM
        # handling into an exit with status 0: the signal is recorded here so the demo can say what happened
        self.signal = signum
        raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--pm-config", default=DEFAULT_PM_CONFIG)
    parser.add_argument("--rloo-config", default="configs/rloo/smollm2_local.yaml")
    parser.add_argument("--rloo-steps", type=int, default=8)
    parser.add_argument("--limit-per-file", type=int, default=None, help="evaluate at most N pairs per LLMBar file")
    args = parser.parse_args(argv)
    state = Stopped()
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, state.handler) for s in caught}
    try:
        return run(args, state)
    except (KeyboardInterrupt, SystemExit):
        if state.signal is None:
            raise
        again = shlex.join(["python", "-m", "lit_route.demo", *(sys.argv[1:] if argv is None else argv)])
        print(f"\ndemo: stopped by {signal.Signals(state.signal).name} during stage '{state.stage}'; nothing after it "
              f"ran and {Path(args.out) / 'summary.json'} was not written. The backbone's features computed so far "
              f"are kept in the feature cache: run `make demo` (or `{again}`) again to continue from them.",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + state.signal) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(args, state: Stopped) -> dict:
    """The demo's stages (see the module docstring); ``state`` records which one is running."""
    from lit_route.cli import _setup_logging, pm_cli, rloo_cli
    from lit_route.data.encoding import PairEncoder
    from lit_route.data.readers import load_pairs
    from lit_route.eval.run import evaluate, write_scores
    from lit_route.judges.replay import ReplayJudge
    from lit_route.preference.scoring import score_pairs

    _setup_logging()
    out = Path(args.out)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    if args.pm_config == DEFAULT_PM_CONFIG:
        cached = any(Path("runs/feature_cache").glob("*/shard-*.pt"))
        print(f"Estimated time: {ESTIMATE_CACHED if cached else ESTIMATE}.", flush=True)
    state.enter("1-2. Uncertainty-aware PM on frozen SmolLM2-135M-Instruct features, then the covariance pass")
    t = time.perf_counter()
    cli = pm_cli(["fit", "--config", args.pm_config, "--trainer.default_root_dir", str(out / "pm")])
    timings["pm_fit_and_finalize_s"] = time.perf_counter() - t
    finalize = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FinalizeCovariance")
    ckpt = finalize.ckpt_path
    val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    module, dm = cli.model, cli.datamodule
    cache_stats = module.feature_cache.stats() if module.feature_cache is not None else {}

    state.enter("3. Routing on LLMBar (419 pairs) with GPT-4's recorded verdicts")
    t = time.perf_counter()
    # scored by the trained module itself, so LLMBar features land in (or come from) the same feature cache
    pairs = load_pairs(LLMBAR_EVAL, limit=args.limit_per_file)
    encoder = PairEncoder(module.tokenizer, dm.hparams.max_length, dm.hparams.template, module.mode)
    d, u = score_pairs(module, pairs, encoder, batch_size=8)
    module.flush_feature_cache()
    scores = out / "llmbar_scores.jsonl"
    write_scores(scores, pairs, d, u)
    gpt4 = evaluate(LLMBAR_EVAL, ReplayJudge(judge="GPT-4"), scores=str(scores), output_dir=str(out / "eval_gpt4"),
                    cache=None, limit_per_file=args.limit_per_file)
    timings["score_and_evaluate_gpt4_s"] = time.perf_counter() - t

    state.enter("3b. The same PM scores with a weaker recorded judge (LLaMA2)")
    t = time.perf_counter()
    llama2 = evaluate(LLMBAR_EVAL, ReplayJudge(judge="LLaMA2"), scores=str(scores),
                      output_dir=str(out / "eval_llama2"), cache=None, limit_per_file=args.limit_per_file)
    timings["evaluate_llama2_s"] = time.perf_counter() - t
    table = routing_table({"GPT-4": gpt4, "LLaMA2": llama2})
    print("\n" + table, flush=True)
    (out / "routing_table.md").write_text(table)

    state.enter("4. RLOO with uncertainty routing to a local judge")
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
        "pm_head": module.head_kind,
        "pm_training_pairs": len(dm.train_set),
        "pm_feature_cache": cache_stats,
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
            "routing_table": str(out / "routing_table.md"),
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


def routing_table(results: dict[str, dict], fractions=(0.0, 0.05, 0.1, 0.25, 0.5)) -> str:
    """Markdown: accuracy at each judged share for uncertainty / random / margin / oracle routing, per judge."""
    lines = ["| judge | judged | uncertainty | random | margin | oracle |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for i, f in enumerate(fractions):
            at = {k: r["curves"][k][r["fractions"].index(f)] for k in ("uncertainty", "random", "margin", "oracle")}
            label = f"{name} (alone: {r['judge_accuracy']:.3f})" if i == 0 else ""
            lines.append(f"| {label} | {int(f * 100)}% | " + " | ".join(f"{at[k]:.3f}" for k in at) + " |")
    first = next(iter(results.values()))
    metrics = first["metrics"]
    lines.append("")
    lines.append(f"PM alone: accuracy {first['pm_accuracy']:.3f}, ECE {metrics['ece']:.3f}, "
                 f"AUROC(ū → error) {metrics['auroc_uncertainty']:.3f} on {first['n_pairs']} pairs.")
    return "\n".join(lines) + "\n"


def _rloo_history(path: Path) -> list[dict[str, float]]:
    import csv

    if not path.exists():
        return []
    with open(path) as fh:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
    return [r for r in rows if "time/update" in r]


if __name__ == "__main__":
    main()
