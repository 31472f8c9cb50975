"""Each stage of the RLOO step against its bare-op floor on this machine, and the algorithmic switches before/after.

The floor of a stage is the model calls it cannot avoid, timed bare (no tokenising, encoding, Python loops,
logging): generation = the prefill and one cached forward per new token; PM scoring = per group one forward of the
shared prefix and one batched forward of the rest of every pair's two sequences, then the head; reference + old
log-probs = one whole forward and one top-layers forward; update = a top-layers forward and backward and the
optimiser step. Ratios near 1 mean the stage is its model calls; the rest is what the framework adds.

Before/after: the same step with each algorithmic switch off (``generation.engine: hf``, ``split_forward:
false``, whole-sequence PM scoring) and on, interleaved.

    python benchmarks/rloo_stages.py --pm_ckpt runs/demo/pm/finalized.ckpt [--steps 6 --repeats 3]

Writes benchmarks/results/rloo_stages.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import lightning as L
import torch
from common import StepTimer, timed
from rloo_vs_trl import SMOL, TARGETS, bench_prompts

import lit_route.policy.pm_scoring as pm_scoring
from lit_route.models.backbone import LoraSpec
from lit_route.models.compat import cache_of, with_cache
from lit_route.policy.data import PromptDataModule
from lit_route.policy.module import RLOOPolicyModule
from lit_route.policy.sampling import GenerationConfig, completion_logprobs, sequence_inputs
from lit_route.rewards.pairwise import upper_pairs

OUT = Path(__file__).resolve().parent / "results"


class KeepRollout(L.Callback):
    """Keeps the last step's batch and rollout, to replay its bare model calls."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batch = batch
        original = module.rollout

        def spy(*args, **kwargs):
            self.rollout = original(*args, **kwargs)
            module.rollout = original
            return self.rollout

        module.rollout = spy


def run(args, prompts, engine: str, split: bool, share_prefix: bool):
    L.seed_everything(0)
    module = RLOOPolicyModule(
        policy=SMOL, lora=LoraSpec(r=8, alpha=16, target_modules=TARGETS, top_layers=4), pm_ckpt=args.pm_ckpt,
        generation=GenerationConfig(num_samples=args.k, max_new_tokens=args.completion, temperature=0.9, top_p=0.95,
                                    engine=engine),
        beta=0.05, lr=5e-5, pm_batch_size=12, split_forward=split, pm_share_prefix=share_prefix)
    path = Path(args.work) / "prompts.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(p.replace("\n", " ") for p in prompts))
    timer, keep = StepTimer(), KeepRollout()
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer, keep])
    trainer.fit(module, PromptDataModule(prompts=str(path), batch_size=args.prompts, max_prompt_tokens=256))
    split_s = {k.split("/")[1]: statistics.median(s[k] for s in timer.splits[1:]) for k in timer.splits[0]}
    return module, keep, {"step_s": statistics.median(timer.times[1:]), "split_s": split_s}


def floors(module: RLOOPolicyModule, keep: KeepRollout) -> dict:
    r, batch = keep.rollout, keep.batch
    policy, k = module.policy, module.generation.num_samples
    comps = r.completions
    ids, mask = batch["prompt_ids"].repeat_interleave(k, 0), batch["prompt_mask"].repeat_interleave(k, 0)

    @torch.no_grad()
    def generation():
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = policy(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        att, p = mask, pos[:, -1:] + 1
        for t in range(comps.shape[1] - 1):
            att = torch.cat([att, torch.ones_like(att[:, :1])], 1)
            out = policy(input_ids=comps[:, t : t + 1], attention_mask=att, position_ids=p, use_cache=True,
                         **with_cache(cache_of(out)))
            p = p + 1

    pm, encoder = module.pm, module._pm_encoder
    ii, jj = upper_pairs(k)
    groups = []
    for b, messages in enumerate(batch["messages"]):
        texts = r.ctx.completions[b]
        enc = [encoder.encode_orders(messages, texts[i], texts[j]) for i, j in zip(ii.tolist(), jj.tolist(), strict=True)]
        seqs = [e[0].input_ids for e in enc] + [e[1].input_ids for e in enc]
        n = pm_scoring.common_prefix(seqs)
        groups.append((seqs, n, cache_of(pm.backbone(input_ids=torch.tensor([seqs[0][:n]]), use_cache=True))))

    @torch.no_grad()
    def pm_scoring_floor():
        for seqs, n, _ in groups:
            cache = cache_of(pm.backbone(input_ids=torch.tensor([seqs[0][:n]]), use_cache=True))
            h = pm_scoring.pooled_with_prefix(pm.backbone, seqs, pm.tokenizer.pad_token_id, cache, n)
            pm.score_pooled(h)

    inputs = sequence_inputs(r.prompt_ids, r.prompt_mask, comps, r.completion_mask)
    trunk = module._trunk()

    @torch.no_grad()
    def reference():
        with policy.disable_adapter(), trunk.capture():
            policy(**inputs, use_cache=False, logits_to_keep=comps.shape[1] + 1)
        trunk.forward_top(trunk.hidden, inputs["attention_mask"], inputs["position_ids"],
                          logits_to_keep=comps.shape[1] + 1)

    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-9)
    state = copy.deepcopy(policy.state_dict())

    def update():
        logits = trunk.forward_top(r.trunk_hidden, inputs["attention_mask"], inputs["position_ids"],
                                   logits_to_keep=comps.shape[1] + 1).logits
        loss = -(completion_logprobs(logits, comps, r.completion_mask) * r.advantages[:, None]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    out = {"generation": timed(generation), "pm_scoring": timed(pm_scoring_floor),
           "reference_logprobs": timed(reference), "update": timed(update)}
    policy.load_state_dict(state)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pm_ckpt", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--completion", type=int, default=40)
    parser.add_argument("--work", default="runs/bench_rloo_stages")
    args = parser.parse_args()
    prompts = bench_prompts(args.prompts * (args.steps + 2))
    before, after, floor = [], [], []
    for _ in range(args.repeats):  # interleaved
        before.append(run(args, prompts, "hf", False, False)[2])
        module, keep, measured = run(args, prompts, "lean", True, True)
        after.append(measured)
        floor.append(floors(module, keep))
    stages = list(after[0]["split_s"])
    med = lambda rows, key: statistics.median(r["split_s"].get(key, 0.0) for r in rows)  # noqa: E731
    report = {
        "config": vars(args),
        "before": before, "after": after, "floor": floor,
        "step_before_s": statistics.median(r["step_s"] for r in before),
        "step_after_s": statistics.median(r["step_s"] for r in after),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "rloo_stages.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"SmolLM2-135M-Instruct policy (LoRA top 4), {args.prompts} prompts x K={args.k}, up to {args.completion} "
        f"new tokens, the PM `{Path(args.pm_ckpt).name}` from `{Path(args.pm_ckpt).parent}`; medians of {args.repeats} interleaved runs x {args.steps - 1} steps.",
        "",
        "| stage | before (hf generate, whole passes, whole PM sequences) | after | after / before | bare-op floor | "
        "after / floor |",
        "|---|---|---|---|---|---|",
    ]
    for stage in stages:
        b, a = med(before, stage), med(after, stage)
        f = statistics.median(r[stage] for r in floor) if stage in floor[0] else None
        lines.append(f"| {stage} | {b:.2f} s | {a:.2f} s | {a / b:.2f}x | "
                     + (f"{f:.2f} s | {a / f:.2f}x |" if f else "— | — |"))
    lines.append(f"| **step** | {report['step_before_s']:.2f} s | {report['step_after_s']:.2f} s | "
                 f"{report['step_after_s'] / report['step_before_s']:.2f}x | | |")
    (OUT / "rloo_stages.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
