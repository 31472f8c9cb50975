"""Routing quality on the constraints task, where the PM learns something: ``routing_quality.py --task constraints``.

1. Data (bundled): the task's 776 training pairs and 669 held-out pairs (76 held-out prompts, 8 samples each);
   a validation split *by prompt* (``--val-share`` of the training prompts) chooses each head's
   hyper-parameters (SNGP ridge and length-scale, Laplace prior precision, dropout rate) by the AUROC of ū as a
   detector of the PM's errors on the validation pairs. The held-out pairs are not looked at until the choice is
   made.
2. SmolLM2-135M-Instruct, frozen, reads every pair in both orders once (``--cache``: later runs reuse it).
3. The judge is the task's verifier (``lit_route.tasks.verify.judge_pair``). Every number gets a 95% interval by
   the cluster bootstrap over held-out prompts (pairs of one prompt share it), and the paired difference
   uncertainty − random per budget with its interval.
4. Risk-controlled routing (each α of ``--risk-alpha``, δ = 0.1) per method over 200 calibration/test splits of the
   held-out prompts (``lit_route.eval.stats.risk_split_test``).
5. Controls: *shuffled ū* (each method's ū permuted across pairs, the PM's scores kept: any "gain" is noise, and
   the intervals should cover 0), and *length* routers (judge the pairs with the longest / shortest responses
   first), on the real PM and on a shuffled PM (its scores permuted across pairs): a router that does as well on
   a shuffled PM exploits the verifier's labels correlating with length, not the PM's errors. Every row also
   gives its recovered share minus that of the length-only control of ``lit-route evaluate``
   (``lit_route.eval.controls``, default variant), paired on the same redraws.

Writes benchmarks/results/routing_quality_constraints.{json,md}.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import lightning as L
import torch
from routing_quality import SMOLLM2, write_jsonl

from lit_route.callbacks.finalize import FinalizeCovariance
from lit_route.data.datamodule import PreferenceDataModule
from lit_route.data.encoding import PairEncoder
from lit_route.data.readers import load_pairs
from lit_route.eval.controls import DEFAULT_LENGTH_BY, length_priority, response_lengths
from lit_route.eval.stats import cluster_ids, risk_split_test, routing_intervals
from lit_route.preference.head_configs import LaplaceConfig, MCDropoutConfig, SNGPConfig
from lit_route.preference.metrics import auroc
from lit_route.preference.module import OptimConfig, PreferenceModule
from lit_route.preference.scoring import score_pairs
from lit_route.tasks.verify import judge_pair

TRAIN = "bundled:constraints/pairs-train.jsonl.gz"
HELDOUT = "bundled:constraints/pairs-heldout.jsonl.gz"
FRACTIONS = [round(i / 20, 2) for i in range(21)]
SHOW = (0.1, 0.25, 0.5)
# hyper-parameter grids, chosen on the validation prompts (None: the head's default, e.g. the median heuristic)
GRIDS = {
    "margin": [{}],
    "sngp": [{"sngp": SNGPConfig(ridge=r, length_scale=ls)} for r, ls in
             ((1.0, None), (0.1, None), (10.0, None), (1.0, 5.0), (1.0, 20.0))],
    "laplace": [{"laplace": LaplaceConfig(prior_precision=p)} for p in ("marglik", 0.1, 1.0, 10.0)],
    "mc_dropout": [{"mc_dropout": MCDropoutConfig(dropout=p)} for p in (0.1, 0.3)],
    "ensemble": [{}],
}


def verifier_credit(pairs) -> torch.Tensor:
    """The verifier's credit for ``chosen`` per pair: 1 (chosen passes, rejected fails), 0.5 (tie), 0."""
    score = {"A": 1.0, "tie": 0.5, "B": 0.0}
    return torch.tensor([score[judge_pair(p.prompt_text(), p.chosen, p.rejected)] for p in pairs], dtype=torch.float64)


def split_by_prompt(pairs, share: float, seed: int):
    prompts = sorted({p.prompt_text() for p in pairs})
    val = set(random.Random(seed).sample(prompts, round(share * len(prompts))))
    return [p for p in pairs if p.prompt_text() not in val], [p for p in pairs if p.prompt_text() in val]


def fit(method: str, options: dict, work: Path, args, tag: str):
    L.seed_everything(args.seed)
    module = PreferenceModule(backbone=SMOLLM2, head=method, freeze_backbone=True, feature_cache=args.cache,
                              optim=OptimConfig(lr=1e-3, weight_decay=1e-2, warmup_steps=10), **options)
    dm = PreferenceDataModule(train=str(work / "fit.jsonl"), val=str(work / "val.jsonl"), max_length=args.max_length,
                              batch_size=32, seed=args.seed)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[FinalizeCovariance(progress=False)],
                        default_root_dir=str(work / tag))
    trainer.fit(module, dm)
    return module


def describe(options: dict) -> str:
    if not options:
        return "default"
    (cfg,) = options.values()
    if isinstance(cfg, SNGPConfig):
        return f"ridge {cfg.ridge}, length-scale {cfg.length_scale or 'median'}"
    if isinstance(cfg, LaplaceConfig):
        return f"prior {cfg.prior_precision}"
    return f"dropout {cfg.dropout}"


def run(args) -> None:
    work, out = Path(args.work) / "constraints", Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = load_pairs([TRAIN]), load_pairs([HELDOUT])
    fit_pairs, val_pairs = split_by_prompt(train, args.val_share, args.seed)
    write_jsonl(work / "fit.jsonl", fit_pairs)
    write_jsonl(work / "val.jsonl", val_pairs)
    print(f"constraints: {len(fit_pairs)} fit + {len(val_pairs)} validation pairs (split by prompt), "
          f"{len(heldout)} held-out pairs", flush=True)
    extractor = PreferenceModule(backbone=SMOLLM2, head="linear", freeze_backbone=True, feature_cache=args.cache)
    encoder = PairEncoder(extractor.tokenizer, max_length=args.max_length)
    start = time.perf_counter()
    for pairs in (heldout, train):
        score_pairs(extractor, pairs, encoder, batch_size=8, progress=False)
        extractor.flush_feature_cache()
    print(f"features: {extractor.feature_cache.misses} sequences computed in {time.perf_counter() - start:.0f}s",
          flush=True)
    del extractor
    credit = verifier_credit(heldout)
    clusters = cluster_ids([p.prompt_text() for p in heldout])
    lengths = torch.tensor([len(p.chosen) + len(p.rejected) for p in heldout], dtype=torch.float64)
    results = {"setup": {"fit_pairs": len(fit_pairs), "val_pairs": len(val_pairs), "heldout_pairs": len(heldout),
                         "heldout_prompts": int(clusters.max()) + 1, "epochs": args.epochs, "n_boot": args.n_boot,
                         "judge": "verifier", "judge_accuracy": float(credit.mean())},
               "methods": {}, "controls": {}}
    perm = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(args.seed))

    control = length_priority(*response_lengths(heldout), DEFAULT_LENGTH_BY)

    def intervals(d, u):
        return routing_intervals(d, u, credit, FRACTIONS, clusters, args.n_boot, seed=args.seed,
                                 priorities={"length": control})

    for method in args.methods:
        if method not in GRIDS:  # the linear head has no ū: nothing to route by
            print(f"  {method}: no uncertainty, skipped", flush=True)
            continue
        tried = []
        best = None
        for i, options in enumerate(GRIDS[method]):
            start = time.perf_counter()
            module = fit(method, options, work, args, f"{method}-{i}")
            d_val, u_val = score_pairs(module, val_pairs, encoder, batch_size=32, progress=False)
            val_auroc = auroc(u_val, (d_val <= 0).long())
            tried.append({"options": describe(options), "val_auroc": val_auroc, "val_accuracy": float((d_val > 0).double().mean()),
                          "fit_s": time.perf_counter() - start})
            print(f"  {method} [{describe(options)}]: validation AUROC {val_auroc:.3f}", flush=True)
            if best is None or val_auroc > best[0]:
                best = (val_auroc, options, module)
        _, options, module = best
        d, u = score_pairs(module, heldout, encoder, batch_size=32, progress=False)
        entry = {"chosen": describe(options), "grid": tried, "intervals": intervals(d, u),
                 "shuffled": intervals(d, u[perm]),
                 "risk": [risk_split_test(d, u, credit, a, 0.1, 200, clusters=clusters, seed=args.seed)
                          for a in args.risk_alpha],
                 "scores": {"d": d.tolist(), "u": u.tolist()}}
        if method == "margin":  # the length controls, on the PM's real and shuffled scores
            results["controls"]["length: longest first"] = {"real": intervals(d, lengths),
                                                             "shuffled": intervals(d[perm], lengths)}
            results["controls"]["length: shortest first"] = {"real": intervals(d, -lengths),
                                                              "shuffled": intervals(d[perm], -lengths)}
        results["methods"][method] = entry
        rec = entry["intervals"]
        print(f"{method} ({entry['chosen']}): recovered {_cell(rec, 'recovered_share')}, AUROC "
              f"{_cell(rec, 'auroc_uncertainty')}", flush=True)
        (out / "routing_quality_constraints.json").write_text(json.dumps(results, indent=2))
        (out / "routing_quality_constraints.md").write_text(markdown(results))  # after each method: a partial run
    print(markdown(results))


def _cell(iv: dict, *path) -> str:
    vals = []
    for part in ("point", "lo", "hi"):
        v = iv[part]
        for key in path:
            v = v[key]
        vals.append(v)
    return "—" if None in vals else f"{vals[0]:.3f} [{vals[1]:.3f}, {vals[2]:.3f}]"


def _row(name: str, iv: dict) -> str:
    idx = [FRACTIONS.index(f) for f in SHOW]
    diffs = " | ".join(_cell(iv, "difference_uncertainty_random", i) for i in idx)
    against = _cell(iv, "recovered_vs_length", "uncertainty") if "recovered_vs_length" in iv["point"] else "—"
    return (f"| {name} | {_cell(iv, 'pm_accuracy')} | {_cell(iv, 'auroc_uncertainty')} | {diffs} | "
            f"{_cell(iv, 'recovered_share')} | {against} |")


def markdown(results: dict) -> str:
    s = results["setup"]
    head = ("| router | PM acc | AUROC(score→err) | " + " | ".join(f"Δ vs random @{int(f * 100)}%" for f in SHOW)
            + " | recovered [0,50%] | − length-only control (paired) |")
    lines = [f"Constraints task: {s['fit_pairs']} training pairs (+{s['val_pairs']} validation pairs by prompt for the "
             f"hyper-parameters), frozen SmolLM2-135M-Instruct features, {s['epochs']} epochs; {s['heldout_pairs']} "
             f"held-out pairs of {s['heldout_prompts']} prompts, verifier as judge (accuracy {s['judge_accuracy']:.3f}). "
             f"95% intervals: cluster bootstrap over prompts, {s['n_boot']} redraws. Δ: accuracy of the router minus "
             "random routing at the same share judged (paired). Length-only control: "
             f"{DEFAULT_LENGTH_BY} (lit_route.eval.controls).", "", head, "|" + "---|" * 8]
    for name, m in results["methods"].items():
        lines.append(_row(f"{name} ({m['chosen']})", m["intervals"]))
    for name, m in results["methods"].items():
        lines.append(_row(f"control: {name}, ū shuffled across pairs", m["shuffled"]))
    for name, c in results["controls"].items():
        lines.append(_row(f"control: {name}", c["real"]))
        lines.append(_row(f"control: {name}, shuffled PM", c["shuffled"]))
    lines += ["", "Risk-controlled routing (δ = 0.1): τ chosen on a random half of the held-out prompts, measured on "
              "the other half, 200 splits.", "",
              "| router | α | share judged (2.5–97.5% of splits) | disagreement left to the PM | ≤ α in | accuracy | random, "
              "same calls |", "|---|---|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        for r in m["risk"]:
            lines.append(f"| {name} | {r['alpha']} | {r['judged_fraction']:.1%} ({r['judged_fraction_range'][0]:.1%}–"
                         f"{r['judged_fraction_range'][1]:.1%}) | {r['disagreement_left']:.3f} | {r['held']:.1%} of splits | "
                         f"{r['accuracy']:.3f} | {r['random_accuracy_same_calls']:.3f} |")
    return "\n".join(lines) + "\n"
