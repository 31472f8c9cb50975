"""Does the PM find its own errors better than response length does? Every router against the length-only control.

    python benchmarks/routing_vs_length.py                      # trains the PM of --pm-config first if absent
    python benchmarks/routing_vs_length.py --sets constraints   # the held-out prompts only

Sets (the verifier of ``lit_route.tasks.verify`` is the judge; 95% intervals: cluster bootstrap over prompts):

- ``constraints``: the bundled pairs of the held-out prompts (four families, topics unseen in training);
- ``shift``: the same pairs plus those of the ``min_words`` prompts (``Describe X in at least n words``, a family
  the PM never saw, on held-out topics: ``bundled:constraints/pairs-shift.jsonl.gz``), as pre-registered in
  ``benchmarks/preregistration/shift.md``. Its gate comes first: the perfect detector (the unseen family's pairs
  first, ties at random) must recover more than zero, interval above zero; only then are the routers compared.

Routers, each judging the same share of pairs: random (expected value), oracle, ``uncertainty`` (highest ū),
``margin`` (smallest |d|), ``learned_pm`` (P(PM wrong) from |d| and log ū), ``learned_pm_surface`` (the same plus
the surface signals log(1 + |a| + |b|) and log(1 + ||a| − |b||)), ``learned_surface`` (the surface signals alone)
and ``length`` (``lit_route.eval.controls``; its other variants are reported beside it as ``length:<by>``). The
learned routers are logistic regressions
(``lit_route.uncertainty.delegation``) fitted on the validation pairs; "PM signals (+ surface)" against "surface
alone" is the PM's own contribution.

Chosen on the validation prompts only (20% of the training prompts, the split of the PM config), before any
held-out number is computed, and recorded in the json's ``validation`` block: the length control's variant (the
largest recovered share there), and the best PM-signal router (the largest recovered share there among
uncertainty, margin, learned_pm and learned_pm_surface; the learned routers measured out of fold, 5 folds by
prompt, so that fitting and measuring never share a pair).

Writes benchmarks/results/routing_vs_length.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from pm_constraints_select import accuracy_by_family

from lit_route.data.holdout import split_by_prompt
from lit_route.data.readers import load_pairs
from lit_route.eval.controls import LENGTH_BY, length_priority, response_lengths
from lit_route.eval.stats import (
    bootstrap,
    cluster_ids,
    percentile_interval,
    routing_statistics,
    unpack_statistics,
)
from lit_route.preference.metrics import auroc
from lit_route.tasks.verify import judge_pair
from lit_route.uncertainty.delegation import PM_SIGNALS, SURFACE_SIGNALS, delegation_signals, fit_delegation

TRAIN = "bundled:constraints/pairs-train.jsonl.gz"
HELDOUT = "bundled:constraints/pairs-heldout.jsonl.gz"
SHIFT = "bundled:constraints/pairs-shift.jsonl.gz"
FRACTIONS = [round(i / 20, 2) for i in range(21)]
SHOW = (0.1, 0.25, 0.5)
LEARNED = {"learned_pm": PM_SIGNALS, "learned_pm_surface": PM_SIGNALS + SURFACE_SIGNALS,
           "learned_surface": SURFACE_SIGNALS}
PM_ROUTERS = ("uncertainty", "margin", "learned_pm", "learned_pm_surface")
L2 = 1e-2


def verifier_credit(pairs) -> torch.Tensor:
    score = {"A": 1.0, "tie": 0.5, "B": 0.0}
    return torch.tensor([score[judge_pair(p.prompt_text(), p.chosen, p.rejected)] for p in pairs], dtype=torch.float64)


def train_pm(config: str, root: Path) -> str:
    from lit_route.cli import pm_cli

    cli = pm_cli(["fit", "--config", config, "--trainer.default_root_dir", str(root)])
    finalize = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FinalizeCovariance")
    return finalize.ckpt_path


def scores(module, encoder, pairs, path: Path, ckpt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The PM's ``(d, ū)`` on ``pairs``, kept in ``path`` for reruns with the same checkpoint."""
    from lit_route.preference.scoring import score_pairs

    stamp = f"{ckpt}:{Path(ckpt).stat().st_mtime_ns}:{len(pairs)}"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["stamp"] == stamp:
            return torch.tensor(saved["d"]), torch.tensor(saved["u"])
    d, u = score_pairs(module, pairs, encoder, batch_size=16, progress=False)
    module.flush_feature_cache()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stamp": stamp, "d": d.tolist(), "u": u.tolist()}))
    return d, u


def recovered_share(d, u, credit, priority: torch.Tensor | None = None) -> float:
    """Recovered share of the (oracle − random) area on [0, 50%] of ū's order, or of ``priority``'s."""
    stats = unpack_statistics(routing_statistics(d, u, credit, FRACTIONS,
                                                 priorities=None if priority is None else {"x": priority}),
                              len(FRACTIONS), [] if priority is None else ["x"])
    return stats["recovered"]["x"] if priority is not None else stats["recovered_share"]


def out_of_fold(signals: dict, wrong: torch.Tensor, names, prompts: list[str], folds: int, seed: int) -> torch.Tensor:
    """P(wrong) (N,) of each validation pair from a model fitted on the other folds (folds by prompt)."""
    distinct = sorted(set(prompts))
    random.Random(seed).shuffle(distinct)
    fold_of = {p: i % folds for i, p in enumerate(distinct)}
    fold = torch.tensor([fold_of[p] for p in prompts])
    out = torch.zeros(len(prompts), dtype=torch.float64)
    for k in range(folds):
        test = fold == k
        model = fit_delegation({s: v[~test] for s, v in signals.items()}, wrong[~test], names, L2)
        out[test] = model.predict({s: v[test] for s, v in signals.items()})
    return out


def validation_choices(d, u, credit, pairs, args) -> tuple[dict, dict]:
    """Everything chosen on the validation pairs: the length variant, the learned models, the best PM router."""
    len_a, len_b = response_lengths(pairs)
    signals = delegation_signals(d, u, len_a, len_b)
    wrong = (d <= 0).double()
    prompts = [p.prompt_text() for p in pairs]
    length = {by: recovered_share(d, u, credit, length_priority(len_a, len_b, by)) for by in LENGTH_BY}
    length_by = max(length, key=length.get)
    models = {name: fit_delegation(signals, wrong, names, L2) for name, names in LEARNED.items()}
    routers = {"uncertainty": recovered_share(d, u, credit), "margin": recovered_share(d, u, credit, -d.abs())}
    for name, names in LEARNED.items():
        routers[name] = recovered_share(d, u, credit, out_of_fold(signals, wrong, names, prompts, 5, args.seed))
    best = max(PM_ROUTERS, key=routers.get)
    block = {"pairs": len(pairs), "prompts": len(set(prompts)), "pm_accuracy": float((d > 0).double().mean()),
             "length_recovered": length, "length_by": length_by, "router_recovered": routers, "best_pm_router": best,
             "learned_models": {k: {"signals": list(m.signals), "weights": m.weights, "bias": m.bias}
                                for k, m in models.items()}}
    return block, models


def evaluate_set(name, pairs, d, u, models, length_by, args, detector: torch.Tensor | None = None) -> dict:
    """Every router on one set: recovered shares, paired differences (vs random, vs length, PM + surface vs
    surface), accuracy at 10/25/50% judged, each with its 95% cluster-bootstrap interval."""
    credit = verifier_credit(pairs)
    len_a, len_b = response_lengths(pairs)
    signals = delegation_signals(d, u, len_a, len_b)
    priorities = {"length": length_priority(len_a, len_b, length_by),
                  **{k: m.predict(signals) for k, m in models.items()},
                  # every variant of the length control, so that a reader sees the strongest one here too
                  **{f"length:{by}": length_priority(len_a, len_b, by) for by in LENGTH_BY if by != length_by}}
    if detector is not None:
        priorities["detector"] = detector
    names = list(priorities)
    clusters = cluster_ids([p.prompt_text() for p in pairs])

    def stat(idx):
        return routing_statistics(d[idx], u[idx], credit[idx], FRACTIONS, priorities={k: v[idx] for k, v in
                                                                                        priorities.items()})

    boot = bootstrap(stat, len(pairs), args.n_boot, seed=args.seed, clusters=clusters)
    point = unpack_statistics(boot["point"], len(FRACTIONS), names)
    samples = [unpack_statistics(s, len(FRACTIONS), names) for s in boot["samples"]]

    def interval(get) -> dict:
        values = torch.tensor([float("nan") if get(s) is None else get(s) for s in samples], dtype=torch.float64)
        lo, hi = percentile_interval(values.unsqueeze(1))
        return {"mid": get(point), "lo": float(lo), "hi": float(hi)}

    at = {f: FRACTIONS.index(f) for f in SHOW}
    routers = ["uncertainty", "margin", *names]
    wrong = 1 - (d > 0).long()
    score = {"uncertainty": u, "margin": -d.abs(), **priorities}
    table = {}
    for r in routers:
        row = {"recovered": interval(lambda s, r=r: s["recovered"][r]),
               "auroc_error": auroc(score[r], wrong),
               "minus_random": {f"{int(f * 100)}%": interval(lambda s, r=r, i=i: s["curves"][r][i] - s["curves"]["random"][i])
                                for f, i in at.items()}}
        if r != "length":
            row["recovered_minus_length"] = interval(lambda s, r=r: s["recovered_vs_length"][r])
            row["minus_length"] = {f"{int(f * 100)}%": interval(lambda s, r=r, i=i: s["difference_vs_length"][r][i])
                                   for f, i in at.items()}
        table[r] = row
    pm_over_surface = interval(lambda s: s["recovered"]["learned_pm_surface"] - s["recovered"]["learned_surface"])
    # post hoc: against the length variant strongest on this very set (chosen on it, which favours the control)
    variants = ["length", *(k for k in names if k.startswith("length:"))]
    strongest = max(variants, key=lambda k: point["recovered"][k])
    against_strongest = {r: interval(lambda s, r=r: s["recovered"][r] - s["recovered"][strongest])
                         for r in (*PM_ROUTERS, "learned_surface")}
    families = accuracy_by_family((d > 0).double(), [p.subset for p in pairs], clusters, args.n_boot, args.seed)
    return {"set": name, "pairs": len(pairs), "prompts": int(clusters.max()) + 1, "judge_accuracy": float(credit.mean()),
            "pm_accuracy_by_family": families, "routers": table,
            "learned_pm_surface_minus_learned_surface": pm_over_surface,
            "post_hoc": {"strongest_length_variant": strongest, "recovered_minus_it": against_strongest},
            "random_at": {f"{int(f * 100)}%": point["curves"]["random"][i] for f, i in at.items()},
            "oracle_at": {f"{int(f * 100)}%": point["curves"]["oracle"][i] for f, i in at.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pm-config", default="configs/pm/constraints_lora.yaml")
    parser.add_argument("--pm-ckpt", default=None, help="default: finalized.ckpt in the config's root, trained if absent")
    parser.add_argument("--cache", default="runs/feature_cache")
    parser.add_argument("--work", default="runs/routing_vs_length")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--sets", nargs="*", default=["constraints", "shift"], choices=("constraints", "shift"),
                        help="none: only the validation choices and the learned models' files under --work")
    parser.add_argument("--val-share", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    import yaml

    from lit_route.preference.features import FeatureCache
    from lit_route.preference.io import load_preference_model

    work, out = Path(args.work), Path(args.out)
    config = yaml.safe_load(Path(args.pm_config).read_text())
    ckpt = args.pm_ckpt or str(Path(config["trainer"]["default_root_dir"]) / "finalized.ckpt")
    if not Path(ckpt).exists():
        ckpt = train_pm(args.pm_config, Path(config["trainer"]["default_root_dir"]))
    module, encoder = load_preference_model(ckpt)
    module.feature_cache = FeatureCache(args.cache)  # the frozen part's outputs are reused across reruns
    train = load_pairs([TRAIN])
    _, val_idx = split_by_prompt([p.prompt_text() for p in train], args.val_share, args.seed)
    val_pairs = [train[i] for i in val_idx]
    d_val, u_val = scores(module, encoder, val_pairs, work / "scores-validation.json", ckpt)
    validation, models = validation_choices(d_val, u_val, verifier_credit(val_pairs), val_pairs, args)
    for name, model in models.items():  # for routing elsewhere (onpolicy_routing.py, `lit-route evaluate --delegation`)
        model.save(work / f"delegation-{name}.json")
    print(f"validation: length by {validation['length_by']}, best PM router {validation['best_pm_router']}, "
          f"recovered {validation['router_recovered']}", flush=True)
    path = out / "routing_vs_length.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({"pm_config": args.pm_config, "pm_ckpt": ckpt, "n_boot": args.n_boot, "seed": args.seed,
                    "validation": validation})
    heldout = load_pairs([HELDOUT])
    d_h, u_h = scores(module, encoder, heldout, work / "scores-heldout.json", ckpt)
    if "constraints" in args.sets:
        results["constraints"] = evaluate_set("constraints", heldout, d_h, u_h, models, validation["length_by"], args)
        write(results, out)
    if "shift" in args.sets:
        shifted = load_pairs([SHIFT])
        d_s, u_s = scores(module, encoder, shifted, work / "scores-shift.json", ckpt)
        pairs = heldout + shifted
        detector = torch.cat([torch.zeros(len(heldout)), torch.ones(len(shifted))]).double()
        d, u = torch.cat([d_h, d_s]), torch.cat([u_h, u_s])
        full = evaluate_set("shift", pairs, d, u, models, validation["length_by"], args, detector=detector)
        gate = full["routers"]["detector"]["recovered"]
        passed = gate["mid"] > 0 and gate["lo"] > 0
        results["shift"] = {"gate": {"perfect_detector_recovered": gate, "passed": passed},
                            **(full if passed else {k: full[k] for k in ("set", "pairs", "prompts",
                                                                         "pm_accuracy_by_family")})}
        write(results, out)
    print(markdown(results))


def summary(results: dict) -> dict:
    """The headline: per set, the best PM-signal router (chosen on validation), its recovered share and its paired
    difference against the length control."""
    best = results["validation"]["best_pm_router"]
    out = {"best_pm_router_chosen_on_validation": best, "length_by": results["validation"]["length_by"]}
    for name in ("constraints", "shift"):
        block = results.get(name)
        if block is None or "routers" not in block:
            out[name] = None if block is None else {"gate_passed": False}
            continue
        row = block["routers"][best]
        out[name] = {"router": best, "recovered": row["recovered"], "minus_length": row["recovered_minus_length"],
                     "uncertainty_recovered": block["routers"]["uncertainty"]["recovered"],
                     "uncertainty_minus_length": block["routers"]["uncertainty"]["recovered_minus_length"],
                     "on_policy": None}
    on_policy = results.get("on_policy")
    if on_policy is not None and out.get("constraints"):  # the RLOO runs sample the constraints task's prompts
        out["constraints"]["on_policy"] = on_policy["headline"]
    return out


def write(results: dict, out: Path) -> None:
    results["summary"] = summary(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing_vs_length.json").write_text(json.dumps(results, indent=2))
    (out / "routing_vs_length.md").write_text(markdown(results))


def _ci(v: dict, pct: bool = True) -> str:
    if v is None or v.get("mid") is None:
        return "—"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:+.3f}")
    return f"{f(v['mid'])} [{f(v['lo'])}, {f(v['hi'])}]"


def markdown(results: dict) -> str:
    v = results["validation"]
    lines = [f"PM: `{results['pm_config']}`; {results['n_boot']} cluster-bootstrap redraws of prompts, seed "
             f"{results['seed']}.", "",
             f"Chosen on the {v['pairs']} validation pairs ({v['prompts']} prompts; PM accuracy {v['pm_accuracy']:.3f}): "
             f"length control by **{v['length_by']}** (recovered there: "
             + ", ".join(f"{k} {100 * x:.1f}%" for k, x in v["length_recovered"].items())
             + f"); best PM-signal router **{v['best_pm_router']}** (recovered there, learned ones out of fold: "
             + ", ".join(f"{k} {100 * x:.1f}%" for k, x in v["router_recovered"].items()) + ")."]
    for name in ("constraints", "shift"):
        block = results.get(name)
        if block is None:
            continue
        lines += ["", f"### {name}: {block['pairs']} pairs of {block['prompts']} prompts", ""]
        if name == "shift":
            g = block["gate"]
            lines += [f"Gate (pre-registered): the perfect detector recovers {_ci(g['perfect_detector_recovered'])} of "
                      f"the (oracle − random) area: **{'passed' if g['passed'] else 'failed'}**"
                      + ("" if g["passed"] else "; the routers are not compared on this set") + ".", ""]
        fam = block["pm_accuracy_by_family"]
        lines.append("PM accuracy: " + "; ".join(f"{f} {x['mid']:.3f} [{x['lo']:.3f}, {x['hi']:.3f}] ({x['pairs']} pairs)"
                                                 for f, x in fam.items()) + ".")
        if "routers" not in block:
            continue
        lines += ["", "| router | AUROC(score→err) | recovered [0, 50%] | − length (paired) | "
                  + " | ".join(f"Δ random @{int(f * 100)}%" for f in SHOW) + " |", "|---|---|---|---|" + "---|" * len(SHOW)]
        for r, row in block["routers"].items():
            diffs = " | ".join(_ci(x, pct=False) for x in row["minus_random"].values())
            lines.append(f"| {r} | {row['auroc_error']:.3f} | {_ci(row['recovered'])} | "
                         f"{_ci(row.get('recovered_minus_length'))} | {diffs} |")
        lines += ["", f"PM signals + surface − surface alone (recovered share): "
                  f"{_ci(block['learned_pm_surface_minus_learned_surface'])}."]
        post = block.get("post_hoc")
        if post is None:
            continue
        lines += ["", f"Post hoc (not chosen in advance): against `{post['strongest_length_variant']}`, the length variant "
                  "strongest on this set itself (a choice that favours the control), recovered share minus its: "
                  + "; ".join(f"{r} {_ci(v)}" for r, v in post["recovered_minus_it"].items()) + "."]
    if results.get("on_policy"):
        lines += ["", *on_policy_lines(results["on_policy"])]
    return "\n".join(lines) + "\n"


def on_policy_lines(block: dict) -> list[str]:
    """The on-policy table (``onpolicy_routing.py``): each router's pooled reward accuracy on the pairs RLOO runs
    sampled, and its paired differences against random and the length control, at 25% judged."""
    n = block["n"]
    shares = list(block["accuracy"]["random"])
    lines = [f"### on policy: {n['pairs']} pairs sampled by the `{block['arm']}` arm of `rlhf_downstream.py` "
             f"({n['seeds']} seeds x {n['steps'] // max(n['seeds'], 1)} steps; {n['decided_pairs']} pairs the "
             "verifier decides)", "",
             "Reward accuracy on the decided pairs when each router's top share of every step's pairs takes the "
             f"verifier's answer; {block['n_boot']} bootstrap redraws of the (seed, step) units, paired.", "",
             "| router | " + " | ".join(f"accuracy @{s}" for s in shares) + " | − random @25% | − length @25% |",
             "|---|" + "---|" * (len(shares) + 2)]
    for r in block["routers"]:
        acc = " | ".join(_ci(block["accuracy"][r][s], pct=False).replace("+", "") for s in shares)
        lines.append(f"| {r} | {acc} | {_ci(block['minus_random'][r]['25%'], pct=False)} | "
                     f"{'—' if r == 'length' else _ci(block['minus_length'][r]['25%'], pct=False)} |")
    return lines


if __name__ == "__main__":
    main()
