"""Downstream proof: does a policy trained with uncertainty-routed rewards beat random routing at equal judge calls?

Task: ``constraints`` (lit_route/tasks/constraints.py), short instructions a program can check. Policy:
SmolLM2-135M-Instruct with LoRA. Reward: the task's PM whose ū best found its errors on the task's validation
prompts (``configs/pm/constraints_laplace.yaml``: frozen SmolLM2 features, Laplace head; chosen by
``routing_quality.py --task constraints`` before the held-out prompts were looked at), with the task's verifier as
the judge (a ``FunctionJudge``); ``--pm-config configs/pm/constraints_sngp.yaml`` rewards with the LoRA + SNGP PM
instead. Every arm shares the seed, the prompts and their order, the sampling and every setting of
``configs/rloo/constraints.yaml``; only the reward differs:

- ``pm_only``: the PM's scores alone (no judge);
- ``random``: the PM, and a random ``--fraction`` of each step's pairs judged (the routing callback's random router);
- ``uncertainty``: the PM, and the ``--fraction`` most uncertain pairs judged (the method);
- ``judge_all``: the verifier judges every pair;
- ``risk`` (``--arms ... risk``): τ chosen each step so that the PM's disagreement with the verifier on the pairs
  it keeps is ≤ 0.1 with probability 0.9, calibrated on a 10% audit share (``lit_route.routing.RiskController``).

With several seeds the summary gives the paired difference uncertainty − random (same seed, same prompts) with
its 95% t interval, and the number of seeds a two-sided test would need to detect the measured difference with
80% power.

Logged per step: KL to the reference and judge calls so far; every ``--eval-every`` steps (and before the first)
the greedy policy's verifier accuracy on the held-out prompts. Every sampled pair, with the PM's d and ū, the
completions' lengths and the verifier's label, goes to ``pairs.jsonl`` in the run's folder
(``benchmarks/onpolicy_routing.py`` computes from it the reward accuracy each router would give on the same
pairs at the same judge calls). Writes
``benchmarks/results/rlhf_downstream.{json,md,png}``; each finished run is kept under ``--work-dir`` so an
interrupted benchmark resumes where it stopped.

    python benchmarks/rlhf_downstream.py                        # trains the PM first if --pm-ckpt is absent
    python benchmarks/rlhf_downstream.py --seeds 0 1 2 3 4 5 6 7 --arms uncertainty random risk
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from lit_route.eval.stats import paired_t_interval, seeds_needed

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BASE_CONFIG = ROOT / "configs" / "rloo" / "constraints.yaml"
PM_CONFIG = ROOT / "configs" / "pm" / "constraints_laplace.yaml"
ARMS = ("pm_only", "random", "uncertainty", "judge_all")
EXTRA_ARMS = ("risk",)  # τ by lit_route.routing.RiskController from a 10% audit share (needs its observe() wired)
JUDGE_FUNCTION = "lit_route.tasks.verify:judge_pair"
JUDGE = {"class_path": "lit_route.judges.FunctionJudge", "init_args": {"function": JUDGE_FUNCTION}}

log = logging.getLogger("rlhf_downstream")


def arm_callbacks(arm: str, fraction: float, seed: int, eval_every: int, heldout: str,
                  pairs_log: str | None = None) -> list[dict]:
    """The ``trainer.callbacks`` of one arm: the held-out evaluation, the routing callback unless PM-only, and with
    ``pairs_log`` the record of every sampled pair with the verifier's label (``onpolicy_routing.PairLog``)."""
    evaluation = {"class_path": "lit_route.callbacks.VerifierEval",
                  "init_args": {"prompts": heldout, "verifier": "lit_route.tasks.verify:passes",
                                "every_n_steps": eval_every}}
    extra = [] if pairs_log is None else [{"class_path": "onpolicy_routing.PairLog",
                                           "init_args": {"path": pairs_log, "verifier": JUDGE_FUNCTION}}]
    if arm == "pm_only":
        return [evaluation, *extra]
    router = "random" if arm == "random" else "uncertainty"
    routing = {"class_path": "lit_route.callbacks.UncertaintyRouting",
               "init_args": {"judge": JUDGE, "router": router, "fraction": 1.0 if arm == "judge_all" else fraction,
                             "order": "fixed", "seed": seed}}
    if arm == "risk":  # the PM's disagreement with the verifier on the pairs it keeps ≤ 0.1 w.p. 0.9
        routing["init_args"].update({"audit_fraction": 0.1, "controller": {
            "class_path": "lit_route.routing.RiskController", "init_args": {"alpha": 0.1, "delta": 0.1}}})
    return [routing, evaluation, *extra]


def train_pm(config: str, work: Path) -> str:
    from lit_route.cli import pm_cli

    cli = pm_cli(["fit", "--config", config, "--trainer.default_root_dir", str(work / "pm")])
    finalize = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FinalizeCovariance")
    return finalize.ckpt_path


def pm_quality(ckpt: str, work: Path) -> dict:
    """The PM on pairs of the held-out prompts, the verifier as judge (``configs/eval/constraints_verifier.yaml``)."""
    from lit_route.eval.run import evaluate
    from lit_route.judges.function import FunctionJudge

    out = work / "pm_eval"
    scored = out / "scores.jsonl"
    # the PM's scores of an earlier run with the same checkpoint are reused (scoring is the slow part)
    reuse = scored.exists() and (out / "pm_ckpt.txt").exists() and (out / "pm_ckpt.txt").read_text() == str(ckpt)
    source = {"scores": str(scored.with_name("scores.reused.jsonl"))} if reuse else {"pm_ckpt": ckpt}
    if reuse:
        scored.with_name("scores.reused.jsonl").write_text(scored.read_text())
    results = evaluate(["bundled:constraints/pairs-heldout.jsonl.gz"], FunctionJudge(JUDGE["init_args"]["function"]),
                       output_dir=str(out), order="fixed", cache=None, progress=False, **source)
    if not reuse:
        (out / "pm_ckpt.txt").write_text(str(ckpt))
    at = {f"{r}@25%": results["curves"][r][results["fractions"].index(0.25)] for r in ("uncertainty", "random")}
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    top = sorted(rows, key=lambda r: -r["uncertainty"])[: round(0.25 * len(rows))]
    families = sorted({r["subset"] for r in rows})
    return {"n_pairs": results["n_pairs"], "accuracy": results["pm_accuracy"],
            "auroc_uncertainty": results["metrics"]["auroc_uncertainty"], "ece": results["metrics"]["ece"],
            "accuracy_by_family": results["by_subset"]["pm"],
            "mean_uncertainty_by_family": {f: statistics.fmean(r["uncertainty"] for r in rows if r["subset"] == f)
                                           for f in families},
            # which families the top 25% by ū are drawn from (what uncertainty routing would send to the judge)
            "top25_uncertainty_share_by_family": {f: sum(r["subset"] == f for r in top) / len(top) for f in families},
            **at}


def run_arm(arm: str, seed: int, args, ckpt: str, work: Path) -> dict:
    """One RLOO run through ``lit-route rloo fit`` with the arm's callbacks; its per-step history."""
    from lit_route.cli import rloo_cli

    out = work / "runs" / f"{arm}-s{seed}"
    config = out / "arm.yaml"
    out.mkdir(parents=True, exist_ok=True)
    pairs_log = out / "pairs.jsonl"
    pairs_log.unlink(missing_ok=True)  # a rerun records its own pairs, not after an interrupted run's
    callbacks = arm_callbacks(arm, args.fraction, seed, args.eval_every, args.heldout, str(pairs_log))
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}, sort_keys=False))
    argv = ["fit", "--config", str(BASE_CONFIG), "--config", str(config), "--model.pm_ckpt", ckpt,
            "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.max_steps", str(args.steps),
            "--trainer.enable_progress_bar", "false", "--seed_everything", str(seed),
            "--model.sample_seed", str(seed), "--data.seed", str(seed)]
    for item in args.set:  # the same override for every arm
        key, _, value = item.partition("=")
        argv += [f"--{key}", value]
    start = time.perf_counter()
    cli = rloo_cli(argv)
    wall = time.perf_counter() - start
    evaluation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "VerifierEval")
    routing = next((cb for cb in cli.trainer.callbacks if type(cb).__name__ == "UncertaintyRouting"), None)
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as fh:
        rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(fh)]
    steps = [r for r in rows if "kl/mean" in r]
    calls, total = [0.0], 0.0
    for r in steps:  # billed judge requests of each step (one per routed pair with order: fixed)
        total += r.get("judge/billed", 0.0)
        calls.append(total)
    history = [{"step": h["step"], "accuracy": h["accuracy"], "by_group": h["by_group"],
                "judge_calls": calls[min(h["step"], len(calls) - 1)]} for h in evaluation.history]
    return {
        "arm": arm, "seed": seed, "wall_s": round(wall, 1),
        "step_s": round(sum(sum(v for k, v in r.items() if k.startswith("time/")) for r in steps) / max(len(steps), 1), 2),
        "eval": history,
        "kl": [round(r["kl/mean"], 6) for r in steps],
        "judge_calls": calls[1:],
        "judge_failures": dict(routing.failures) if routing is not None else {},
        "pairs_seen": routing.pairs_seen if routing is not None else 0,
        "final_completions": evaluation.last_completions[:12],
    }


AUDIT = {"pairs": "audit/pairs", "pm": "audit/pm_agreement", "pm_lo": "audit/pm_agreement_lo",
         "pm_hi": "audit/pm_agreement_hi", "system": "audit/system_agreement", "system_lo": "audit/system_agreement_lo",
         "system_hi": "audit/system_agreement_hi", "gain": "audit/gain", "gain_lo": "audit/gain_lo",
         "gain_hi": "audit/gain_hi", "pays_off": "audit/pays_off"}


def last_audit(run_dir: Path) -> dict | None:
    """The audit-share estimates the run logged at its last step (``None``: no audit share)."""
    logs = sorted(run_dir.glob("logs/version_*/metrics.csv"))
    if not logs:
        return None
    with open(logs[-1]) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("audit/pairs") and r.get("audit/pm_agreement")]
    return {k: float(rows[-1][v]) for k, v in AUDIT.items() if rows[-1].get(v)} if rows else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], arms: list[str]) -> dict:
    """Per arm: final accuracy mean ± std over seeds, judge calls, wall time; the routing comparisons."""
    by_arm = {a: [r for r in runs if r["arm"] == a] for a in arms}
    table = {}
    for arm, rs in by_arm.items():
        if not rs:
            continue
        final = [r["eval"][-1]["accuracy"] for r in rs]
        start = [r["eval"][0]["accuracy"] for r in rs]
        mean, std = _mean_std(final)
        steps = [h["step"] for h in rs[0]["eval"]]
        curve = [statistics.fmean(r["eval"][i]["accuracy"] for r in rs) for i in range(len(steps))]
        calls = [statistics.fmean(r["eval"][i]["judge_calls"] for r in rs) for i in range(len(steps))]
        table[arm] = {"seeds": [r["seed"] for r in rs], "start_accuracy": statistics.fmean(start),
                      "final_accuracy": mean, "final_std": std, "final_by_seed": final,
                      "gain": mean - statistics.fmean(start), "judge_calls": calls[-1],
                      "final_kl": statistics.fmean(r["kl"][-1] for r in rs),
                      "wall_s": statistics.fmean(r["wall_s"] for r in rs),
                      "steps": steps, "mean_curve": curve, "mean_calls": calls,
                      "audit_last": [{"seed": r["seed"], **r["audit_last"]} for r in rs if r.get("audit_last")]}
    out = {"arms": table}
    if "uncertainty" in table and "random" in table:
        u, r = table["uncertainty"], table["random"]
        # paired by seed: the seeds both arms ran (same prompts, same order, same sampling seed)
        runs_of = {a: {x["seed"]: x for x in by_arm[a]} for a in ("uncertainty", "random")}
        common = [s for s in u["seeds"] if s in runs_of["random"]]
        paired = [runs_of["uncertainty"][s]["eval"][-1]["accuracy"] - runs_of["random"][s]["eval"][-1]["accuracy"]
                  for s in common]
        target = r["final_accuracy"]
        reach = next((i for i, acc in enumerate(u["mean_curve"]) if acc >= target), None)
        out["uncertainty_vs_random"] = {
            "gap": u["final_accuracy"] - r["final_accuracy"],
            "seed_spread": max(u["final_std"], r["final_std"]),
            "paired_gap_by_seed": paired,
            "beats_by_more_than_spread": u["final_accuracy"] - r["final_accuracy"] > max(u["final_std"], r["final_std"]),
            "calls_to_reach_random_final": None if reach is None else u["mean_calls"][reach],
            "random_final_calls": r["judge_calls"],
            "calls_ratio": None if reach is None or not r["judge_calls"] else u["mean_calls"][reach] / r["judge_calls"],
        }
        paired_iv = paired_t_interval(paired)
        out["uncertainty_vs_random"]["paired_interval"] = paired_iv
        # secondary: the mean of each run's evaluations after step 0 (less noise than the last one alone)
        along = [statistics.fmean(h["accuracy"] for h in runs_of["uncertainty"][s]["eval"][1:])
                 - statistics.fmean(h["accuracy"] for h in runs_of["random"][s]["eval"][1:]) for s in common]
        out["uncertainty_vs_random"]["paired_interval_mean_over_evals"] = paired_t_interval(along)
        out["uncertainty_vs_random"]["paired_kl_interval"] = paired_t_interval(
            [runs_of["uncertainty"][s]["kl"][-1] - runs_of["random"][s]["kl"][-1] for s in common])
        out["uncertainty_vs_random"]["seeds_needed_80pct_power"] = (
            seeds_needed(paired_iv["mean"], paired_iv["sd"]) if paired_iv["sd"] else None)
    if "judge_all" in table:
        out["judge_all_gain_points"] = 100 * table["judge_all"]["gain"]
    if "pm_only" in table:
        out["pm_only_is_floor"] = all(table["pm_only"]["final_accuracy"] <= v["final_accuracy"]
                                      for k, v in table.items() if k != "pm_only")
    return out


def markdown(summary: dict, pm: dict, settings: dict) -> str:
    lines = [f"RLOO on the constraints task, {settings['steps']} steps, {settings['prompts_per_step']} prompts x "
             f"K={settings['k']}, judge fraction {settings['fraction']:.0%} for the routed arms, seeds "
             f"{settings['seeds']}; held-out verifier accuracy of the greedy policy on {settings['heldout_prompts']} prompts.",
             "",
             f"PM on {pm['n_pairs']} held-out pairs: accuracy {pm['accuracy']:.3f}, AUROC(ū → error) "
             f"{pm['auroc_uncertainty']:.3f}, ECE {pm['ece']:.3f}; with 25% of the pairs judged: uncertainty "
             f"{pm['uncertainty@25%']:.3f}, random {pm['random@25%']:.3f}.",
             "",
             "| arm | seeds | accuracy at step 0 | final accuracy (mean ± std over seeds) | gain (points) | judge calls | final KL | wall time / run |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, row in summary["arms"].items():
        lines.append(f"| {arm} | {len(row['seeds'])} | {row['start_accuracy']:.3f} | {row['final_accuracy']:.3f} ± {row['final_std']:.3f} "
                     f"| {100 * row['gain']:+.1f} | {row['judge_calls']:.0f} | {row['final_kl']:.4f} | {row['wall_s'] / 60:.1f} min |")
    cmp = summary.get("uncertainty_vs_random")
    if cmp:
        ratio = "not reached" if cmp["calls_ratio"] is None else f"{cmp['calls_ratio']:.2f}x"
        lines += ["", f"Uncertainty − random: {100 * cmp['gap']:+.1f} points (seed spread {100 * cmp['seed_spread']:.1f}; "
                  f"paired by seed: {', '.join(f'{100 * g:+.1f}' for g in cmp['paired_gap_by_seed'])}); calls for "
                  f"uncertainty routing to reach random's final accuracy: {ratio} of random's."]
        iv = cmp.get("paired_interval")
        if iv and iv["lo"] is not None:
            verdict = "separates from 0" if iv["lo"] > 0 or iv["hi"] < 0 else "does not separate from 0"
            need = cmp.get("seeds_needed_80pct_power")
            lines.append(f"Paired difference over {iv['n']} seeds: {100 * iv['mean']:+.1f} points, 95% t interval "
                         f"[{100 * iv['lo']:+.1f}, {100 * iv['hi']:+.1f}] ({verdict}); detecting a difference this "
                         f"size with 80% power would take about {need if need is not None else '—'} seeds.")
        along = cmp.get("paired_interval_mean_over_evals")
        if along and along["lo"] is not None:
            verdict = "separates from 0" if along["lo"] > 0 or along["hi"] < 0 else "does not separate from 0"
            lines.append(f"Secondary, the mean of each run's evaluations after step 0: {100 * along['mean']:+.1f} points, "
                         f"95% t interval [{100 * along['lo']:+.1f}, {100 * along['hi']:+.1f}] ({verdict}).")
        kl = cmp.get("paired_kl_interval")
        if kl and kl["lo"] is not None:
            lines.append(f"Final KL, uncertainty − random: {kl['mean']:+.2f}, 95% t interval [{kl['lo']:+.2f}, "
                         f"{kl['hi']:+.2f}].")
    for arm, row in summary["arms"].items():
        audits = row.get("audit_last") or []
        if audits:  # the run's own estimates from its audit share, at its last step
            lines.append(f"{arm}, audit-share estimates at the last step (95% intervals), per seed: " + "; ".join(
                f"seed {a['seed']}: {a['pairs']:.0f} audited pairs, PM agreement {a['pm']:.3f} [{a['pm_lo']:.3f}, "
                f"{a['pm_hi']:.3f}], routed system {a['system']:.3f} [{a['system_lo']:.3f}, {a['system_hi']:.3f}], "
                f"routing gain {100 * a['gain']:+.1f} [{100 * a['gain_lo']:+.1f}, {100 * a['gain_hi']:+.1f}] points, "
                f"audit/pays_off {a['pays_off']:+.0f}" for a in audits)
                + " (pays_off: +1 pays off, −1 worse than random, 0 not distinguishable or no verdict yet).")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, row in summary["arms"].items():
        label = f"{arm} ({len(row['seeds'])} seeds)"
        ax1.plot(row["steps"], row["mean_curve"], marker="o", label=label)
        ax2.plot(row["mean_calls"], row["mean_curve"], marker="o", label=label)
    ax1.set(xlabel="RLOO step", ylabel="held-out verifier accuracy (greedy)", title="accuracy vs step")
    ax2.set(xlabel="judge calls so far", ylabel="held-out verifier accuracy (greedy)", title="accuracy vs judge calls")
    ax2.set_xscale("symlog", linthresh=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("rlhf_downstream: constraints task, SmolLM2-135M policy, mean over each arm's seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pm-ckpt", default="runs/pm_constraints_laplace/finalized.ckpt",
                        help="finalised constraints PM; trained with --pm-config when absent")
    parser.add_argument("--pm-config", default=str(PM_CONFIG), help="PM config to train when --pm-ckpt is absent")
    parser.add_argument("--judge-all-from", default=None,
                        help="work dir of another run of this benchmark whose judge_all results to reuse: that arm "
                             "never reads the PM's scores (every pair is judged), so it is the same for any PM")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS + EXTRA_ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--fraction", type=float, default=0.25, help="judge fraction of the routed arms")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--heldout", default="bundled:constraints/prompts-heldout.jsonl")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of configs/rloo/constraints.yaml for every arm, e.g. model.lr=1e-4")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--work-dir", default="runs/rlhf_downstream", help="runs, PM and per-run results")
    parser.add_argument("--name", default="rlhf_downstream", help="stem of the files under benchmarks/results")
    parser.add_argument("--rerun", action="store_true", help="rerun arms whose results are already in --work-dir")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: the report of the runs of --seeds and --arms already in --work-dir")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # the CLIs below get their arguments explicitly, not from this command line
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    ckpt = args.pm_ckpt
    if not Path(ckpt).exists():
        log.info("no PM at %s: training one with %s", ckpt, args.pm_config)
        ckpt = train_pm(args.pm_config, work)
    pm_file = work / "pm_quality.json"
    if pm_file.exists() and not args.rerun and json.loads(pm_file.read_text()).get("ckpt") == str(ckpt):
        pm = json.loads(pm_file.read_text())
    else:
        pm = {"ckpt": str(ckpt), **pm_quality(ckpt, work)}
        pm_file.write_text(json.dumps(pm, indent=2))
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            done = work / "runs" / f"{arm}-s{seed}" / "result.json"
            shared = Path(args.judge_all_from or work) / "runs" / f"{arm}-s{seed}" / "result.json"
            if arm == "judge_all" and args.judge_all_from and shared.exists():
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(shared.read_text())
            if done.exists() and not args.rerun:
                result = json.loads(done.read_text())
                result.setdefault("audit_last", last_audit(done.parent))
                runs.append(result)
                continue
            if args.report_only:
                log.info("%s, seed %d: not run, left out of the report", arm, seed)
                continue
            log.info("== %s, seed %d ==", arm, seed)
            result = run_arm(arm, seed, args, ckpt, work)
            result["audit_last"] = last_audit(work / "runs" / f"{arm}-s{seed}")
            done.write_text(json.dumps(result, indent=2))
            runs.append(result)
    from lit_route.callbacks.verifier_eval import read_task_prompts

    base = yaml.safe_load(BASE_CONFIG.read_text())
    settings = {"steps": args.steps, "seeds": args.seeds, "fraction": args.fraction, "eval_every": args.eval_every,
                "k": base["model"]["generation"]["num_samples"], "prompts_per_step": base["data"]["batch_size"],
                "max_new_tokens": base["model"]["generation"]["max_new_tokens"],
                "heldout_prompts": len(read_task_prompts(args.heldout)), "threads": torch.get_num_threads()}
    summary = summarise(runs, args.arms)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"settings": settings, "pm": pm, "summary": summary, "runs": runs}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{args.name}.md").write_text(markdown(summary, pm, settings))
    plot(summary, RESULTS / f"{args.name}.png")
    print(markdown(summary, pm, settings))
    return report


if __name__ == "__main__":
    main()
