"""GPU check, stage ``rloo_step``: RLOO steps of an 8B-shaped policy with LoRA and HF generation, one GPU.

``RLOOPolicyModule`` under the Trainer as ``configs/rloo/llama8b_anthropic.yaml`` sets it up, on one GPU and
without a judge: a Llama-3-8B-shaped policy with random weights written as a Hugging Face folder and loaded the
ordinary way (bf16, gradient checkpointing), LoRA r = 16 on every projection, ``precision: bf16-mixed``,
``generation.engine: hf``; the reward an 8B-shaped SNGP PM on the same weights (``pm_backbone``: its covariance
the prior). Each step samples K completions per prompt, scores the K(K−1) ordered pairs, computes the reference and
old log-probabilities and updates the adapters. Reports each stage's seconds as the module logs them
(``time/*``), the step time and generated tokens/s (medians over the steps after the warm-up), and the peak
memory of those steps.

    python benchmarks/gpu_rloo.py --json runs/gpu_rloo.json [--prompts 4 --k 4 --new_tokens 256 --steps 2]
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from gpu_common import device, device_name, median, peak_memory, reset_peak_memory, run_stage, sync
from gpu_shapes import model_shape, parameter_bytes, scratch_dir, write_random_model

from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.policy.data import PromptDataModule
from lit_route.policy.module import RLOOPolicyModule
from lit_route.policy.sampling import GenerationConfig

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULTS = {"prompts": (4, 2), "k": (4, 2), "new_tokens": (256, 8), "steps": (2, 1), "warmup": (1, 1)}
STAGES = ("generation", "pm_scoring", "reference_logprobs", "update")
PROMPTS = [
    "Explain why the sky is blue to a ten-year-old.",
    "Write a short poem about a lighthouse in winter.",
    "What are three ways to reduce the memory use of a Python program?",
    "Summarise the causes of the French Revolution in one paragraph.",
    "How do I politely decline a meeting invitation from my manager?",
    "Give me a recipe for a vegetarian lasagna.",
    "What is the difference between a list and a tuple in Python?",
    "Describe the water cycle step by step.",
]


def add_options(parser) -> None:
    for name, (real, dry) in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=int, default=None, help=f"default {real} (dry run {dry})")


class StepRecorder(L.Callback):
    """Each step's wall time (queued GPU work included) and the metrics the module logged; the peak memory is
    reset when the first step after the warm-up starts."""

    def __init__(self, dev: torch.device, warmup: int):
        self.dev, self.warmup = dev, warmup
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            reset_peak_memory(self.dev)
        sync(self.dev)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        sync(self.dev)
        self.steps.append({"step_s": time.perf_counter() - self.start, **module.last_step})


def main(args, report) -> None:
    opts = {name: pair[1 if args.dry_run else 0] if getattr(args, name) is None else getattr(args, name)
            for name, pair in DEFAULTS.items()}
    dev = device(args.dry_run)
    shape = model_shape(args.dry_run)
    report.update(device=device_name(dev), shape=shape, **opts, engine="hf", precision="bf16-mixed",
                  lora="r=16 on every projection", policy_dtype="bfloat16", pm="SNGP on the same weights (bf16)")
    folder = scratch_dir(args.work, parameter_bytes(shape))
    try:
        start = time.perf_counter()
        write_random_model(folder / "model", shape, dev)
        prompts = folder / "prompts.txt"
        n = opts["prompts"] * (opts["warmup"] + opts["steps"])  # distinct prompts (the data module dedups)
        prompts.write_text("\n".join(f"{PROMPTS[i % len(PROMPTS)]} ({i // len(PROMPTS) + 1})" for i in range(n)))
        report.update(write_model_s=time.perf_counter() - start, model_folder=str(folder))
        run(folder, prompts, dev, opts, report)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # 16 GB, possibly in /dev/shm


def run(folder: Path, prompts: Path, dev: torch.device, opts: dict, report) -> None:
    start = time.perf_counter()
    spec = {"model_path": str(folder / "model"), "dtype": "bfloat16"}
    module = RLOOPolicyModule(
        policy=BackboneSpec(**spec, gradient_checkpointing=True),
        lora=LoraSpec(r=16, alpha=32, target_modules=PROJECTIONS),
        pm_backbone=BackboneSpec(**spec),
        generation=GenerationConfig(num_samples=opts["k"], max_new_tokens=opts["new_tokens"], temperature=1.0,
                                    engine="hf"),
        beta=0.05, lr=1e-6, pm_batch_size=32)
    data = PromptDataModule(prompts=str(prompts), batch_size=opts["prompts"], max_prompt_tokens=1024)
    report.update(load_s=time.perf_counter() - start)
    recorder = StepRecorder(dev, opts["warmup"])
    trainer = L.Trainer(accelerator="gpu" if dev.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=opts["warmup"] + opts["steps"], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(module, data)
    measured = recorder.steps[opts["warmup"]:]
    if not measured:
        raise RuntimeError(f"no step after the warm-up ran ({len(recorder.steps)} steps in all)")
    memory = peak_memory(dev)
    sequences = opts["prompts"] * opts["k"]
    stage_s = {name: median([s.get(f"time/{name}", math.nan) for s in measured]) for name in STAGES}
    step_s = median([s["step_s"] for s in measured])
    tokens = median([s["response/length"] * sequences for s in measured])
    report.update(
        steps_run=len(recorder.steps), median_step_s=step_s, stage_s=stage_s, stages_sum_s=sum(stage_s.values()),
        generated_tokens_per_step=tokens, generation_tokens_per_s=tokens / stage_s["generation"],
        peak_memory_gib=memory["peak_allocated_gib"], peak_reserved_gib=memory["peak_reserved_gib"],
        memory_basis=memory["basis"],
        losses=[s["train/loss"] for s in recorder.steps], kl=[s["kl/mean"] for s in recorder.steps],
        finite=all(math.isfinite(s[k]) for s in recorder.steps for k in ("train/loss", "kl/mean", "reward/std")),
        per_step=[{k: v for k, v in s.items() if k == "step_s" or k.startswith("time/")} for s in recorder.steps])


if __name__ == "__main__":
    run_stage("rloo_step", __doc__, main, add_options)
