"""Held-out and LLMBar quality of preference-model checkpoints (accuracy, ECE, AUROC of ū for errors).

    python benchmarks/pm_quality.py --ckpt sngp=runs/a/finalized.ckpt --ckpt linear=runs/b/epoch=0-step=65.ckpt

The held-out split is rebuilt from the training config (same files, limits, fraction and seed).
Writes benchmarks/results/pm_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import yaml

from lit_route.data.readers import load_pairs
from lit_route.preference.io import load_preference_model
from lit_route.preference.metrics import PreferenceMetrics
from lit_route.preference.scoring import score_pairs

LLMBAR = ["bundled:llmbar/Natural.json", "bundled:llmbar/Adversarial-Neighbor.json",
          "bundled:llmbar/Adversarial-GPTInst.json", "bundled:llmbar/Adversarial-GPTOut.json",
          "bundled:llmbar/Adversarial-Manual.json"]


def held_out(config_path: str):
    data = yaml.safe_load(Path(config_path).read_text())["data"]
    pairs = load_pairs(data["train"], "auto", data.get("skip_invalid", False), data.get("limit_per_file"))
    idx = list(range(len(pairs)))
    random.Random(data.get("seed", 0)).shuffle(idx)
    n_val = max(1, round(len(pairs) * data.get("val_fraction", 0.1)))
    return [pairs[i] for i in sorted(idx[:n_val])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", action="append", required=True, help="name=path")
    parser.add_argument("--config", default="configs/pm/smollm2_sngp.yaml")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    sets = {"held_out": held_out(args.config), "llmbar": load_pairs(LLMBAR)}
    results = {}
    for spec in args.ckpt:
        name, path = spec.split("=", 1)
        module, encoder = load_preference_model(path)
        results[name] = {}
        for set_name, pairs in sets.items():
            d, u = score_pairs(module, pairs, encoder, batch_size=8)
            metrics = PreferenceMetrics()
            metrics.update(d, u)
            results[name][set_name] = {"n": len(pairs), **metrics.compute(with_uncertainty=module.has_uncertainty)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pm_quality.json").write_text(json.dumps(results, indent=2))
    lines = ["| head | set | pairs | accuracy | ECE | AUROC(ū→error) |", "|---|---|---|---|---|---|"]
    for name, by_set in results.items():
        for set_name, m in by_set.items():
            auroc = f"{m['auroc_uncertainty']:.3f}" if "auroc_uncertainty" in m else "n/a (no ū)"
            lines.append(f"| {name} | {set_name} | {m['n']} | {m['accuracy']:.3f} | {m['ece']:.3f} | {auroc} |")
    (out / "pm_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
