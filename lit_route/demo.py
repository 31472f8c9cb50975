"""The main job, offline, on a real small model (``make demo`` / ``python -m lit_route.demo``).

Two sets, two answers to "does routing by the PM's uncertainty pay?", each against random routing and a
length-only control, with 95% intervals:

1. a constraints-task PM (frozen SmolLM2-135M-Instruct cut to 6 layers, mean-pooled, a Laplace head: a posterior
   over its last layer gives each pair's uncertainty ū) trained on bundled verifier-labelled pairs, then its
   covariance pass;
2. routing on the pre-registered shift set: held-out prompts plus a family it never saw (``at least N words``,
   whose cue is the opposite of the ``at most N words`` it learned), the task's verifier as the judge: here the
   PM's uncertainty finds its errors;
3. a general PM with an SNGP head (the paper's) on frozen SmolLM2 features of MT-Bench, LLMEval² and FairEval
   human-labelled pairs, then its covariance pass;
4. routing on LLMBar (Natural + 4 Adversarial sets), where the PM is worse than chance (the adversarial sets are
   built so that the polished answer is the wrong one), with GPT-4's and LLaMA2's recorded verdicts: whether
   routing pays there is printed as measured (with LLaMA2, a judge barely better than the PM, there is little to gain);
5. a short RLOO run with the routing callback on the constraints task: SmolLM2 policy (LoRA), the PM of step 1 as
   the reward, the verifier as the judge for the most uncertain quarter of the pairs;
6. a summary and where every artefact was written.
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
SHIFT_SET = ["bundled:constraints/pairs-heldout.jsonl.gz", "bundled:constraints/pairs-shift.jsonl.gz"]
CONSTRAINTS_PM = "configs/pm/demo_constraints.yaml"
LLMBAR_PM = "configs/pm/demo_llmbar_sngp.yaml"
RLOO_CONFIG = "configs/rloo/demo_constraints.yaml"
VERIFIER = "lit_route.tasks.verify:judge_pair"

# Wall times of `python -m lit_route.demo` measured on 2 idle AVX-512 cores (AMD EPYC), with an empty feature cache
# and with a full one; a run scales them by how fast this machine multiplies matrices (see calibrate()).
REFERENCE_S = {"empty": 363.0, "cached": 147.0}
REFERENCE_RATE = 170.0  # calibrate() on that machine, GFLOP/s


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
    # the first line, before any heavy import: a new user sees at once what runs and for about how long
    print("lit_route demo: two PMs on frozen SmolLM2-135M features, routing by their uncertainty against random and "
          "a length-only control on three sets, then RLOO with routed rewards (offline). Importing...", flush=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--constraints-pm-config", default=CONSTRAINTS_PM, help="stage 1's `pm fit` config")
    parser.add_argument("--llmbar-pm-config", default=LLMBAR_PM, help="stage 3's `pm fit` config")
    parser.add_argument("--rloo-config", default=RLOO_CONFIG, help="stage 5's `rloo fit` config")
    parser.add_argument("--rloo-steps", type=int, default=8)
    parser.add_argument("--limit-per-file", type=int, default=None, help="evaluate at most N pairs per file")
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


def calibrate(rounds: int = 5, seconds: float = 0.2) -> float:
    """This machine's float32 matmul rate (GFLOP/s) on the backbone's feed-forward shape, with the threads torch
    uses: what the feature passes, which take most of the run, scale with. The best of ``rounds`` short rounds: one
    round varies by a third on a shared machine, the best of five by a few percent."""
    import torch

    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    a @ b  # warm-up
    best = 0.0
    for _ in range(rounds):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            done += 1
        best = max(best, 2 * 1024 * 576 * 1536 * done / (time.perf_counter() - start) / 1e9)
    return best


def estimate(cached: bool) -> str:
    rate = calibrate()
    minutes = REFERENCE_S["cached" if cached else "empty"] * REFERENCE_RATE / rate / 60
    return (f"Estimated time: about {max(minutes, 1):.0f} min on this machine ({rate:.0f} GFLOP/s measured just now; "
            f"{REFERENCE_S['empty'] / 60:.0f} min on 2 idle AVX-512 cores at {REFERENCE_RATE:.0f} GFLOP/s with an "
            f"empty feature cache, {REFERENCE_S['cached'] / 60:.1f} min with a full one). Each feature pass shows "
            f"its time left.")


def fit_pm(config: str, out: Path) -> tuple[str, object, dict]:
    """``pm fit`` of ``config`` into ``out``: the finalised checkpoint, the CLI (module, datamodule) and the
    validation metrics."""
    from lit_route.cli import pm_cli

    cli = pm_cli(["fit", "--config", config, "--trainer.default_root_dir", str(out)])
    finalize = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FinalizeCovariance")
    val = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    return finalize.ckpt_path, cli, val


def score(cli, data: list[str], path: Path, limit: int | None):
    """The trained module's ``(d, ū)`` on ``data`` (its features land in, or come from, the feature cache),
    written as a ``pm score`` file."""
    from lit_route.data.encoding import PairEncoder
    from lit_route.data.readers import load_pairs
    from lit_route.eval.scores import write_scores
    from lit_route.preference.scoring import score_pairs

    module, dm = cli.model, cli.datamodule
    pairs = load_pairs(data, limit=limit)
    encoder = PairEncoder(module.tokenizer, dm.hparams.max_length, dm.hparams.template, module.mode)
    d, u = score_pairs(module, pairs, encoder, batch_size=8)
    write_scores(path, pairs, d, u)
    return str(path)


def run(args, state: Stopped) -> dict:
    """The demo's stages (see the module docstring); ``state`` records which one is running."""
    from lit_route.cli import _setup_logging, rloo_cli
    from lit_route.demo_report import table, verdict
    from lit_route.eval.run import evaluate
    from lit_route.judges.function import FunctionJudge
    from lit_route.judges.replay import ReplayJudge

    _setup_logging()
    out = Path(args.out)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    cached = any(Path("runs/feature_cache").glob("*/shard-*.pt"))
    print(estimate(cached), flush=True)

    state.enter("1. Constraints PM: frozen SmolLM2 (6 layers, mean-pooled) + Laplace head, then its covariance pass")
    t = time.perf_counter()
    constraints_ckpt, constraints_cli, constraints_val = fit_pm(args.constraints_pm_config, out / "pm_constraints")
    timings["constraints_pm_s"] = time.perf_counter() - t

    state.enter("2. Routing on the shift set (held-out prompts + an unseen family), the verifier as judge")
    t = time.perf_counter()
    scores = score(constraints_cli, SHIFT_SET, out / "shift_scores.jsonl", args.limit_per_file)
    shift = evaluate(SHIFT_SET, FunctionJudge(VERIFIER), scores=scores, output_dir=str(out / "eval_shift"),
                     order="fixed", cache=None, limit_per_file=args.limit_per_file)
    timings["shift_routing_s"] = time.perf_counter() - t

    state.enter("3. LLMBar PM: frozen SmolLM2 features + SNGP head, then its covariance pass")
    t = time.perf_counter()
    llmbar_ckpt, llmbar_cli, llmbar_val = fit_pm(args.llmbar_pm_config, out / "pm_llmbar")
    timings["llmbar_pm_s"] = time.perf_counter() - t

    state.enter("4. Routing on LLMBar (419 pairs) with GPT-4's, then LLaMA2's recorded verdicts")
    t = time.perf_counter()
    scores = score(llmbar_cli, LLMBAR_EVAL, out / "llmbar_scores.jsonl", args.limit_per_file)
    llmbar = {name: evaluate(LLMBAR_EVAL, ReplayJudge(judge=name), scores=scores, cache=None,
                             output_dir=str(out / f"eval_llmbar_{name.lower().replace('-', '')}"),
                             limit_per_file=args.limit_per_file) for name in ("GPT-4", "LLaMA2")}
    timings["llmbar_routing_s"] = time.perf_counter() - t
    sets = {"constraints shift (verifier)": shift, **{f"LLMBar ({k})": v for k, v in llmbar.items()}}
    report = table(sets)
    print("\n" + report, flush=True)
    (out / "routing_table.md").write_text(report)

    state.enter("5. RLOO on the constraints task, the most uncertain quarter of the pairs sent to the verifier")
    t = time.perf_counter()
    rloo = rloo_cli(["fit", "--config", args.rloo_config, "--model.pm_ckpt", constraints_ckpt,
                     "--trainer.default_root_dir", str(out / "rloo"), "--trainer.max_steps", str(args.rloo_steps)])
    timings["rloo_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    rloo_log = _rloo_history(Path(rloo.trainer.logger.log_dir) / "metrics.csv")
    routing = next(cb for cb in rloo.trainer.callbacks if type(cb).__name__ == "UncertaintyRouting")

    def at(results: dict, router: str, f: float) -> float:
        return results["curves"][router][results["fractions"].index(f)]

    summary = {
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "pms": {
            "constraints": {"checkpoint": constraints_ckpt, "config": args.constraints_pm_config, "validation": constraints_val},
            "llmbar": {"checkpoint": llmbar_ckpt, "config": args.llmbar_pm_config, "validation": llmbar_val},
        },
        "routing": {
            name: {"verdict": verdict(r), "pm_accuracy": r["pm_accuracy"], "judge_accuracy": r["judge_accuracy"],
                   "auroc_uncertainty": r["metrics"]["auroc_uncertainty"],
                   **{f"{router}@{int(f * 100)}%": at(r, router, f) for f in (0.1, 0.25, 0.5)
                      for router in ("uncertainty", "margin", "random", "length", "oracle")}}
            for name, r in sets.items()
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
            "routing_table": str(out / "routing_table.md"),
            "shift_results": str(out / "eval_shift" / "results.json"),
            **{f"llmbar_{k}_results": str(out / f"eval_llmbar_{k.lower().replace('-', '')}" / "results.json")
               for k in llmbar},
            "rloo_metrics": str(Path(rloo.trainer.logger.log_dir) / "metrics.csv"),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n== Summary ==")
    print(json.dumps(summary, indent=2))
    print(f"\nrouting table: {out / 'routing_table.md'}   summary: {out / 'summary.json'}   "
          f"total {timings['total_s'] / 60:.1f} min")
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
