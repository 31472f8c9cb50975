"""PM training pairs/s with and without the feature cache, for a frozen backbone (head only) and for LoRA on the
top 2 layers (cached inputs of the lowest adapted layer).

    python benchmarks/pm_feature_cache.py [--pairs 32] [--epochs 3]

Also times the covariance pass that ends training (``FinalizeCovariance``) against the epochs: with the cache it
reads the cached features instead of the backbone.

Same SmolLM2-135M-Instruct, same pairs (the first HH-RLHF harmless pairs, bundled), same batches, one Lightning
fit per setting; the cache starts empty, so epoch 1 of a cached run pays the backbone and later epochs do not.
Writes benchmarks/results/pm_feature_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
from routing_quality import SMOLLM2, write_jsonl

from lit_route.callbacks.finalize import FinalizeCovariance
from lit_route.data.datamodule import PreferenceDataModule
from lit_route.data.readers import load_pairs
from lit_route.models.backbone import LoraSpec
from lit_route.preference.module import OptimConfig, PreferenceModule


class EpochTimer(L.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_epoch_start(self, *args):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, *args):
        self.seconds.append(time.perf_counter() - self._start)


def run(train: str, lora: LoraSpec | None, cache: str | None, epochs: int, max_length: int, root: str) -> dict:
    L.seed_everything(0)
    # a Laplace head: no pre-training pass (SNGP's length-scale heuristic would fill the cache before epoch 1)
    module = PreferenceModule(backbone=SMOLLM2, head="laplace", lora=lora, freeze_backbone=lora is None,
                              feature_cache=cache, optim=OptimConfig(lr=1e-3))
    dm = PreferenceDataModule(train=train, val_fraction=0.0, max_length=max_length, batch_size=8)
    timer = EpochTimer()
    # the covariance pass as training ends it (Laplace: the GGN of the last layer over every training sequence)
    finalize = FinalizeCovariance(progress=False, stable_copy=False)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer, finalize],
                        default_root_dir=root)
    trainer.fit(module, dm)
    n = len(dm.train_set)
    return {"epoch_seconds": timer.seconds, "pairs_per_s": [n / s for s in timer.seconds],
            "covariance_s": finalize.seconds, "covariance_over_last_epoch": finalize.seconds / timer.seconds[-1],
            "covariance_over_first_epoch": finalize.seconds / timer.seconds[0],
            "cache": module.feature_cache.stats() if module.feature_cache is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    pairs = load_pairs(["bundled:hh-rlhf/harmless-base-test.jsonl.gz"], skip_invalid=True)[: args.pairs]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        train = str(Path(tmp) / "train.jsonl")
        write_jsonl(Path(train), pairs)
        for name, lora in (("head only (frozen backbone)", None), ("LoRA on the top 2 layers", LoraSpec(top_layers=2))):
            for cached in (False, True):
                cache = str(Path(tmp) / f"cache-{len(results)}") if cached else None
                results[f"{name}, {'cache' if cached else 'no cache'}"] = run(train, lora, cache, args.epochs,
                                                                               args.max_length, tmp)
                print(name, cached, results[f"{name}, {'cache' if cached else 'no cache'}"]["pairs_per_s"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pm_feature_cache.json").write_text(json.dumps({"pairs": args.pairs, "max_length": args.max_length,
                                                           "results": results}, indent=2))
    lines = ["| setting | " + " | ".join(f"epoch {i + 1} pairs/s" for i in range(args.epochs))
             + " | covariance pass | / last epoch | / first epoch |",
             "|---|" + "---|" * (args.epochs + 3)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in r["pairs_per_s"])
                     + f" | {r['covariance_s']:.2f} s | {r['covariance_over_last_epoch']:.3f}x"
                     f" | {r['covariance_over_first_epoch']:.3f}x |")
    (out / "pm_feature_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
