"""Active learning: judged pairs as labels for the PM, chosen by uncertainty or at random, on LLMBar.

The 419 LLMBar pairs (Natural + 4 Adversarial) are split at random into a *pool* and a *held-out* half. Round 0
is the demo's PM (``configs/pm/smollm2_frozen_uq.yaml``: frozen SmolLM2-135M-Instruct features, bundled training
data, none of these pairs). Each round spends ``--labels`` judge verdicts (GPT-4, recorded, both display orders)
on pool pairs not labelled before, chosen either by the PM's uncertainty (the most uncertain first) or at random;
the decided ones (ties and order flips are not labels) join the training data, ``pm fit --continue_from.pm_ckpt``
continues from the previous round, and the covariance pass runs again. The held-out half measures the PM and its
routing after each round. The feature cache makes every refit after the first cost seconds.

    python benchmarks/active_learning.py [--rounds 2 --labels 50]

Writes benchmarks/results/active_learning.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lit_route.cli import pm_cli
from lit_route.data.readers import load_pairs
from lit_route.eval.export import write_judged_pairs
from lit_route.eval.run import evaluate
from lit_route.eval.scores import write_scores
from lit_route.judges.loop import run_sync
from lit_route.judges.pairwise import judge_pairs
from lit_route.judges.replay import ReplayJudge
from lit_route.preference.features import FeatureCache
from lit_route.preference.io import load_preference_model
from lit_route.preference.scoring import score_pairs

OUT = Path(__file__).resolve().parent / "results"
CONFIG = "configs/pm/smollm2_frozen_uq.yaml"
LLMBAR = [f"bundled:llmbar/{n}.json" for n in ("Natural", "Adversarial-Neighbor", "Adversarial-GPTInst",
                                                "Adversarial-GPTOut", "Adversarial-Manual")]
TRAIN = ["bundled:hh-rlhf/harmless-base-test.jsonl.gz", "bundled:llmbar/Processed-MT-Bench.json",
         "bundled:llmbar/Processed-LLMEval2.json", "bundled:llmbar/Processed-FairEval.json"]


def write_pairs(path: Path, pairs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for p in pairs:
            fh.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "id": p.id,
                                 "subset": p.subset}) + "\n")


def fit(root: Path, extra: list[str], head: str, continue_from: str | None, epochs: int | None, cache: Path) -> str:
    args = ["fit", "--config", CONFIG, "--trainer.default_root_dir", str(root), "--model.head", head,
            "--model.feature_cache", str(cache),
            "--data.train", json.dumps(TRAIN + extra), "--trainer.enable_progress_bar", "false"]
    if continue_from:
        args += ["--continue_from.pm_ckpt", continue_from]
    if epochs:
        args += ["--trainer.max_epochs", str(epochs)]
    pm_cli(args)
    return str(root / "finalized.ckpt")


def scored(ckpt: str, pairs, cache: Path):
    """(d, ū) of ``pairs`` under the checkpoint, the frozen backbone's features read from the shared cache."""
    module, encoder = load_preference_model(ckpt)
    module.feature_cache = FeatureCache(cache)
    d, u = score_pairs(module, pairs, encoder, progress=False)
    module.flush_feature_cache()
    return d, u


def measure(ckpt: str, heldout, heldout_file: Path, work: Path, cache: Path) -> dict:
    d, u = scored(ckpt, heldout, cache)
    scores = work / "scores.jsonl"
    write_scores(scores, heldout, d, u)
    r = evaluate([str(heldout_file)], ReplayJudge(judge="GPT-4"), scores=str(scores), output_dir=str(work),
                 cache=None, progress=False)
    at = {f: r["curves"][k][r["fractions"].index(f)] for k in ("uncertainty",) for f in (0.1, 0.25)}
    return {"pm_accuracy": r["pm_accuracy"], "auroc": r["metrics"].get("auroc_uncertainty"),
            "ece": r["metrics"]["ece"], "uncertainty_auc": r["area_under_curve"]["uncertainty"],
            "random_auc": r["area_under_curve"]["random"], "at_10": at[0.1], "at_25": at[0.25]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--labels", type=int, default=50, help="judge verdicts (pairs) bought per round")
    parser.add_argument("--head", default="margin")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each continued fit")
    parser.add_argument("--work", default="runs/bench_active_learning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--feature-cache", default="runs/feature_cache",
                        help="the frozen backbone's features; the demo's cache already holds every sequence used here")
    args = parser.parse_args()
    work = Path(args.work)
    cache = Path(args.feature_cache)
    pairs = load_pairs(LLMBAR)
    random.Random(args.seed).shuffle(pairs)
    pool, heldout = pairs[: len(pairs) // 2], pairs[len(pairs) // 2 :]
    write_pairs(work / "pool.jsonl", pool)
    write_pairs(work / "heldout.jsonl", heldout)
    gpt4 = ReplayJudge(judge="GPT-4")
    verdicts = run_sync(judge_pairs(gpt4, [(p.prompt_text(), p.chosen, p.rejected) for p in pool], order="both"))
    round0 = fit(work / "round0", [], args.head, None, None, cache)
    rows = [{"strategy": "none", "round": 0, "labels": 0, **measure(round0, heldout, work / "heldout.jsonl", work / "eval0", cache)}]
    print(json.dumps(rows[-1]))
    for strategy in ("uncertainty", "random"):
        ckpt, chosen = round0, []
        for rnd in range(1, args.rounds + 1):
            _, u = scored(ckpt, pool, cache)
            free = [i for i in range(len(pool)) if i not in set(chosen)]
            if strategy == "uncertainty":
                free.sort(key=lambda i: -float(u[i]))
            else:
                random.Random(args.seed * 100 + rnd).shuffle(free)
            chosen += free[: args.labels]
            labels = work / strategy / f"labels{rnd}.jsonl"
            written = write_judged_pairs(labels, [pool[i] for i in chosen], [verdicts[i].score for i in chosen],
                                         "GPT-4")
            ckpt = fit(work / strategy / f"round{rnd}", [str(labels)], args.head, ckpt, args.epochs, cache)
            rows.append({"strategy": strategy, "round": rnd, "labels": len(chosen), "decided_labels": written,
                         **measure(ckpt, heldout, work / "heldout.jsonl", work / strategy / f"eval{rnd}", cache)})
            print(json.dumps(rows[-1]))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "active_learning.json").write_text(json.dumps({"config": vars(args), "pool": len(pool),
                                                          "heldout": len(heldout), "rows": rows}, indent=2))
    lines = [
        f"Pool {len(pool)} / held-out {len(heldout)} LLMBar pairs; {args.labels} GPT-4 verdicts bought per round; "
        f"head `{args.head}`; measured on the held-out half with GPT-4 as the judge.",
        "", "| selection | round | judge calls (pairs) | labels used | PM accuracy | AUROC(ū→error) | ECE | "
        "routed acc @10% | @25% | AUC uncertainty | AUC random |", "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['round']} | {r['labels']} | {r.get('decided_labels', 0)} | "
                     f"{r['pm_accuracy']:.3f} | {r['auroc'] or float('nan'):.3f} | {r['ece']:.3f} | {r['at_10']:.3f} | "
                     f"{r['at_25']:.3f} | {r['uncertainty_auc']:.3f} | {r['random_auc']:.3f} |")
    (OUT / "active_learning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
