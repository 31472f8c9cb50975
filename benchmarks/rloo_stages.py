"""Each stage of the RLOO step against its bare-op floor on this machine, and the algorithmic switches before/after.

The floor of a stage is the model calls it cannot avoid, timed bare (no tokenising, encoding, Python loops,
logging): generation = the prefill and one cached forward per new token; PM scoring = per group one forward of the
shared prefix and one batched forward of the rest of every pair's two sequences, then the head; reference
log-probs = one whole forward (the sampling policy's log-probs are the update's own pass); update = a top-layers
forward and backward and the optimiser step. Ratios near 1 mean the stage is its model calls; the rest is what the framework adds.

Before/after: the same step with each algorithmic switch off (``generation.engine: hf``, ``split_forward:
false``, whole-sequence PM scoring) and on, interleaved.

With ``--engine vllm`` the step runs on colocated vLLM (merged-weight sync) instead, one engine shared by the
repeats, and the generation floor is the decode-shaped matmul floor: every linear layer of the model (fused as
vLLM's Llama runs them: qkv, gate_up) timed bare with ``torch.nn.functional.linear`` at the rows the engine ran,
the prompts' tokens once (prefix caching shares them among a prompt's K samples) and then, per new token, the
sequences still running, the output layer on those rows only. Attention's own arithmetic and sampling are left
out, so the floor is below what any engine can reach. The matmul rate of that sweep at all rows is reported.

    python benchmarks/rloo_stages.py --pm_ckpt runs/demo/pm/finalized.ckpt [--steps 6 --repeats 3]
    python benchmarks/rloo_stages.py --pm_ckpt ... --engine vllm --prompts 8 --completion 128   # [vllm] extra

Writes benchmarks/results/rloo_stages.{json,md} (``rloo_stages_vllm.*`` with ``--engine vllm``).
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


def run(args, prompts, engine: str, split: bool, share_prefix: bool, shared_engine=None):
    L.seed_everything(0)
    module = RLOOPolicyModule(
        policy=SMOL, lora=LoraSpec(r=8, alpha=16, target_modules=TARGETS, top_layers=4), pm_ckpt=args.pm_ckpt,
        generation=GenerationConfig(num_samples=args.k, max_new_tokens=args.completion, temperature=0.9, top_p=0.95,
                                    engine=engine),
        beta=0.05, lr=5e-5, pm_batch_size=12, split_forward=split, pm_share_prefix=share_prefix)
    if shared_engine is not None:  # vLLM holds one engine per process
        module.engine = shared_engine
    path = Path(args.work) / "prompts.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(p.replace("\n", " ") for p in prompts))
    timer, keep = StepTimer(), KeepRollout()
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer, keep])
    trainer.fit(module, PromptDataModule(prompts=str(path), batch_size=args.prompts, max_prompt_tokens=256))
    split_s = {k.split("/")[1]: statistics.median(s[k] for s in timer.splits[1:]) for k in timer.splits[0]}
    return module, keep, {"step_s": statistics.median(timer.times[1:]), "split_s": split_s}


def linear_sweeps(policy) -> list[list[torch.Tensor]]:
    """The model's linear weights as vLLM's Llama runs them, grouped by the input they read: qkv and gate_up
    fused, the output layer last (the merged LoRA weights have the base's shapes; adapter matrices are left out)."""
    named = {n.replace("base_model.model.", "").replace(".base_layer", ""): m.weight.detach()
             for n, m in policy.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n}
    fused = {"q_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj")}
    parts = {part for group in fused.values() for part in group}
    weights = []
    for name, w in named.items():
        head, _, leaf = name.rpartition(".")
        if leaf in fused:
            weights.append(torch.cat([named[f"{head}.{p}"] for p in fused[leaf]]).contiguous())
        elif leaf not in parts:
            weights.append(w.contiguous())
    return weights


def decode_floor(policy, prompt_tokens: int, running: list[int], prompts: int) -> tuple[float, float]:
    """Seconds of the generation's matmuls alone (see the module's doc), and their rate in GFLOP/s at the most
    rows the decode ran.

    Args:
        prompt_tokens: The unique prompts' tokens (the prefill's rows).
        running: Sequences still running at each new token (the decode's rows, step by step).
        prompts: Prompts in the batch (the prefill's output-layer rows).
    """
    weights = linear_sweeps(policy)
    body, head = weights[:-1], weights[-1]

    widths = {w.shape[1] for w in weights}
    inputs = {width: torch.randn(max(prompt_tokens, *running), width) for width in widths}  # made before timing

    def sweep(rows: int, head_rows: int) -> None:
        for w in body:
            torch.nn.functional.linear(inputs[w.shape[1]][:rows], w)
        torch.nn.functional.linear(inputs[head.shape[1]][:head_rows], head)

    with torch.no_grad():
        per_rows = {m: timed(lambda m=m: sweep(m, m), repeats=5) for m in set(running)}
        prefill = timed(lambda: sweep(prompt_tokens, prompts), repeats=3)
    most = max(running)
    flops = 2 * most * sum(w.numel() for w in weights)
    return prefill + sum(per_rows[m] for m in running), flops / per_rows[most] / 1e9


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

    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-9)
    state = copy.deepcopy(policy.state_dict())

    def update():
        logits = trunk.forward_top(r.trunk_hidden, inputs["attention_mask"], inputs["position_ids"],
                                   logits_to_keep=comps.shape[1] + 1).logits
        loss = -(completion_logprobs(logits, comps, r.completion_mask) * r.advantages[:, None]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    if module.generation.engine == "vllm":
        # the first token comes out of the prefill; each later one is a decode step over the sequences running
        running = [int(n) for n in r.completion_mask.sum(0)[1:].tolist() if n > 0]
        seconds, rate = decode_floor(policy, int(batch["prompt_mask"].sum()), running, len(batch["messages"]))
        generation_floor = {"generation": seconds, "decode_matmul_gflops": rate}
    else:
        generation_floor = {"generation": timed(generation)}
    out = {**generation_floor, "pm_scoring": timed(pm_scoring_floor),
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
    parser.add_argument("--engine", choices=["lean", "vllm"], default="lean",
                        help="lean: before/after the switches; vllm: the colocated vLLM step against its floors")
    args = parser.parse_args()
    prompts = bench_prompts(args.prompts * (args.steps + 2))
    if args.engine == "vllm":
        return vllm_stages(args, prompts)
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


def vllm_stages(args, prompts) -> None:
    """The step on colocated vLLM (merged-weight sync), each stage against its floor."""
    after, floor, engine = [], [], None
    for _ in range(args.repeats):
        module, keep, measured = run(args, prompts, "vllm", True, True, engine)
        engine = module.engine  # one engine per process: the repeats share it
        after.append(measured)
        floor.append(floors(module, keep))
    med = lambda key: statistics.median(r["split_s"].get(key, 0.0) for r in after)  # noqa: E731
    floor_of = lambda key: statistics.median(f[key] for f in floor)  # noqa: E731
    report = {"config": vars(args), "after": after, "floor": floor,
              "step_s": statistics.median(r["step_s"] for r in after)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "rloo_stages_vllm.json").write_text(json.dumps(report, indent=2))
    sync, rate = med("engine_sync"), floor_of("decode_matmul_gflops")
    lines = [
        f"SmolLM2-135M-Instruct policy (LoRA top 4) on colocated vLLM (merged-weight sync), {args.prompts} prompts x "
        f"K={args.k}, up to {args.completion} new tokens, the PM `{Path(args.pm_ckpt).name}`; medians of "
        f"{args.repeats} runs x {args.steps - 1} steps. Decode-shaped matmul rate in this run: {rate:.0f} GFLOP/s.",
        "",
        "| stage | measured | floor | measured / floor | goal |",
        "|---|---|---|---|---|",
    ]
    goals = {"generation": 1.5}
    for stage in [k for k in after[0]["split_s"] if k != "engine_sync"]:
        a = med(stage)
        f = floor_of(stage) if stage in floor[0] else None
        goal = f"<= {goals.get(stage, 1.2)}x" if f else ""
        lines.append(f"| {stage} | {a:.2f} s | " + (f"{f:.2f} s | {a / f:.2f}x | {goal} |" if f else "— | — | |"))
        if stage == "generation" and f:
            lines.append(f"| generation without the sync ({sync:.2f} s) | {a - sync:.2f} s | {f:.2f} s | "
                         f"{(a - sync) / f:.2f}x | {goal} |")
    lines.append(f"| **step** | {report['step_s']:.2f} s | | | |")
    (OUT / "rloo_stages_vllm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
