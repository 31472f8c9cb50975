"""How PM scoring of one RLOO group grows with K and sequence length, and what batching both orders saves.

A group of K completions has K(K−1)/2 pairs, i.e. K(K−1) ordered sequences for the pairwise PM (a pointwise
reward model would read K). Times one group's scoring with both orders of every pair in one forward pass
(what ``score_groups`` does) against one forward pass per order.

    python benchmarks/scaling.py --pm runs/.../finalized.ckpt

Writes benchmarks/results/scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import timed

from lit_route.data.encoding import pad_batch
from lit_route.policy.pm_scoring import load_reward_pm, score_groups
from lit_route.rewards.pairwise import upper_pairs


def one_order_per_pass(pm, encoder, prompt, completions) -> None:
    k = len(completions)
    ii, jj = upper_pairs(k)
    for order in (0, 1):
        seqs = [encoder.encode_orders(prompt, completions[i], completions[j])[order].input_ids
                for i, j in zip(ii.tolist(), jj.tolist(), strict=True)]
        with torch.no_grad():
            batch = pad_batch(seqs, pm.tokenizer.pad_token_id)
            pm.head.predict(pm.pooled(batch["input_ids"], batch["attention_mask"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pm", required=True)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    pm, encoder = load_reward_pm(args.pm)
    prompt = [{"role": "user", "content": "Give me three tips for sleeping better."}]
    rows = []
    for words in (16, 48):
        for k in (2, 4, 6, 8):
            completions = [" ".join(f"tip{i} word{w}" for w in range(words)) for i in range(k)]
            n_pairs = k * (k - 1) // 2
            both = timed(lambda c=completions, n=n_pairs: score_groups(pm, encoder, [prompt], [c], batch_size=n))
            split = timed(lambda c=completions: one_order_per_pass(pm, encoder, prompt, c))
            length = len(encoder.encode_orders(prompt, completions[0], completions[1])[0].input_ids)
            rows.append({"k": k, "tokens_per_sequence": length, "sequences": 2 * n_pairs,
                         "both_orders_one_pass_s": both, "one_pass_per_order_s": split, "saving": 1 - both / split})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(rows, indent=2))
    lines = ["| K | tokens / sequence | sequences K(K−1) | both orders, one pass | one pass per order | saved |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['k']} | {r['tokens_per_sequence']} | {r['sequences']} | {r['both_orders_one_pass_s']:.2f} s | "
              f"{r['one_pass_per_order_s']:.2f} s | {100 * r['saving']:.0f}% |" for r in rows]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
