"""A judge cascade against the strong judge alone, by cost, on the LLMBar family with recorded verdicts.

PM → ChatGPT (cheap) → GPT-4 (strong), from the recorded verdicts of both on all 885 LLMBar-family pairs, each
pair seen in both display orders. The recorded verdicts carry no token counts: each is charged the prompt as this
project renders it (4 characters a token) plus 8 output tokens, at the list prices of gpt-4-0613 ($30 / $60 per
million input / output tokens) and gpt-3.5-turbo-0613 ($1.5 / $2), so costs compare the judges, not invoices.

Strategies (``lit_route.eval.cascade``): the strong judge alone on the most uncertain pairs; the cheap judge
alone; bands (top share to GPT-4, the next to ChatGPT; the best split for each cost); escalation (ChatGPT on the
most uncertain pairs, GPT-4 where ChatGPT's two display orders disagree or it failed).

    python benchmarks/judge_cascade.py --pm_ckpt runs/demo/pm/finalized.ckpt

Writes benchmarks/results/judge_cascade.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from lit_route.eval.run import evaluate
from lit_route.judges.replay import ReplayJudge

OUT = Path(__file__).resolve().parent / "results"
LLMBAR_FAMILY = [f"bundled:llmbar/{name}.json" for name in (
    "Natural", "Adversarial-Neighbor", "Adversarial-GPTInst", "Adversarial-GPTOut", "Adversarial-Manual",
    "Processed-MT-Bench", "Processed-LLMEval2", "Processed-FairEval")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pm_ckpt", required=True)
    parser.add_argument("--work", default="runs/bench_judge_cascade")
    args = parser.parse_args()
    gpt4 = ReplayJudge(judge="GPT-4", price_input_per_mtok=30.0, price_output_per_mtok=60.0, output_tokens=8)
    chatgpt = ReplayJudge(judge="ChatGPT", price_input_per_mtok=1.5, price_output_per_mtok=2.0, output_tokens=8)
    results = evaluate(LLMBAR_FAMILY, gpt4, pm_ckpt=args.pm_ckpt, output_dir=args.work, cache=None,
                       cheap_judge=chatgpt, progress=False, max_failed_fraction=1.0, skip_invalid=True)
    cas = results["cascade"]
    OUT.mkdir(parents=True, exist_ok=True)
    summary = {
        "n_pairs": results["n_pairs"], "pm_accuracy": results["pm_accuracy"],
        "gpt4_accuracy": results["judge_accuracy"], "chatgpt_accuracy": cas["cheap_accuracy"],
        "gpt4_all_cost_usd": cas["strong_all_cost_usd"], "chatgpt_all_cost_usd": cas["cheap_only"]["cost"][-1],
        "at_budget": cas["at_budget"], "pm_ckpt": args.pm_ckpt,
    }
    (OUT / "judge_cascade.json").write_text(json.dumps({**summary, "cascade": cas}, indent=2))
    lines = [
        f"{results['n_pairs']} LLMBar-family pairs, both display orders. PM alone {results['pm_accuracy']:.3f}; "
        f"GPT-4 alone {results['judge_accuracy']:.3f} (${cas['strong_all_cost_usd']:.2f} for every pair, "
        f"estimated); ChatGPT alone {cas['cheap_accuracy']:.3f} (${cas['cheap_only']['cost'][-1]:.2f}).",
        "",
        "| budget (share of GPT-4-on-everything) | budget | PM → GPT-4 | PM → ChatGPT | PM → ChatGPT → GPT-4 (best bands) "
        "| PM → ChatGPT, doubt → GPT-4 |",
        "|---|---|---|---|---|---|",
    ]
    for share, row in cas["at_budget"].items():
        cells = [f"{row[k]:.3f}" if row[k] is not None else "—"
                 for k in ("strong_only", "cheap_only", "bands", "escalate")]
        lines.append(f"| {float(share):.0%} | ${row['budget_usd']:.2f} | " + " | ".join(cells) + " |")
    (OUT / "judge_cascade.md").write_text("\n".join(lines) + "\n")
    shutil.copy(Path(args.work) / "cost_curve.png", OUT / "judge_cascade.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
