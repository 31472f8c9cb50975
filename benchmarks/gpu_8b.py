"""GPU check, stage ``pm_step``: the PM training step of an 8B-shaped Llama with LoRA and the SNGP head, one GPU.

Llama-3-8B shapes with random frozen weights in bf16, LoRA r = 16 on every projection (float32 adapters),
gradient checkpointing per layer, the SNGP head with D = 4096 (float32; its precision float64), under Lightning's
bf16-mixed autocast: the one-GPU form of ``configs/pm/llama8b_sngp_lora.yaml`` (whose FSDP keeps the frozen
weights in float32, sharded over 8 GPUs). Measures, over the steps after the warm-up: the median step time,
tokens/s, the peak memory of the steps, MFU; then the covariance pass on one batch (a no-grad forward and
``accumulate``) and ``finalize`` of the D × D precision in float64.

MFU counts model FLOPs, not recomputation: per token 4N for the frozen dense weights (forward, and the backward's
input gradients; frozen weights get no weight gradients), 6N for the LoRA weights, and causal attention (2·L·d per
layer forward, twice that backward). HFU adds the forward that gradient checkpointing recomputes.

    python benchmarks/gpu_8b.py --json runs/gpu_8b.json [--pairs 4 --length 1024 --steps 6 --warmup 2]

``benchmarks/gpu_check.sh`` runs it with the other stages and collects it into ``results/gpu_check.json``.
"""

from __future__ import annotations

import math

import torch
from gpu_common import (
    device,
    device_name,
    median,
    peak_memory,
    peak_tflops,
    reset_peak_memory,
    run_stage,
    timed,
)
from gpu_shapes import model_shape, random_model

from lit_route.models.backbone import LoraSpec, apply_lora
from lit_route.models.pooling import pool_last_token
from lit_route.preference.losses import bradley_terry_loss
from lit_route.uncertainty import SNGPHead

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULTS = {"pairs": (4, 2), "length": (1024, 32), "steps": (6, 2), "warmup": (2, 1), "features": (4096, 64)}


def add_options(parser) -> None:
    for name, (real, dry) in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=int, default=None, help=f"default {real} (dry run {dry})")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s "
                        "(default: from the device name)")


def flops_per_token(backbone: torch.nn.Module, shape: dict, length: int) -> dict:
    """Model and hardware FLOPs per token of one step (see the module docstring).

    Args:
        backbone: The LoRA-wrapped backbone (dense = every base parameter but the embedding; LoRA = ``lora_``).
        shape: Its shape (layers, heads, hidden size).
        length: Tokens per sequence.
    """
    dense = sum(p.numel() for n, p in backbone.named_parameters() if "lora_" not in n and "embed_tokens" not in n)
    lora = sum(p.numel() for n, p in backbone.named_parameters() if "lora_" in n)
    # causal attention: a query at position i meets i keys; QKᵀ and AV are 2·d·L/2 FLOPs each on average
    attention = 2 * shape["num_hidden_layers"] * shape["hidden_size"] * length
    model = (2 * dense + attention + 2 * lora) + (2 * dense + 2 * attention + 4 * lora)
    return {"dense_params": dense, "lora_params": lora, "model_flops_per_token": model,
            "hardware_flops_per_token": model + 2 * dense + attention + 2 * lora}


def main(args, report) -> None:
    opts = {name: pair[1 if args.dry_run else 0] if getattr(args, name) is None else getattr(args, name)
            for name, pair in DEFAULTS.items()}
    from lightning.fabric.plugins.precision import MixedPrecision

    dev = device(args.dry_run)
    shape = model_shape(args.dry_run)
    report.update(device=device_name(dev), shape=shape, **opts,
                  precision="bf16 frozen weights, float32 LoRA and head, bf16-mixed autocast; SNGP precision float64")
    backbone = random_model(shape, dev, torch.bfloat16)
    backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone = apply_lora(backbone, LoraSpec(r=16, alpha=32, target_modules=PROJECTIONS))
    backbone.train()
    head = SNGPHead(shape["hidden_size"], num_features=opts["features"]).to(dev)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    amp = MixedPrecision("bf16-mixed", dev.type)  # what Trainer(precision="bf16-mixed") uses
    n = 2 * opts["pairs"]
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (n, opts["length"]), device=dev, generator=gen)
    mask = torch.ones_like(ids)
    labels = torch.cat([torch.ones(opts["pairs"]), torch.zeros(opts["pairs"])]).to(dev)  # both orders of each pair
    adapter_dtypes = sorted({str(p.dtype) for n_, p in backbone.named_parameters() if "lora_" in n_})
    report.update(params=sum(p.numel() for p in backbone.parameters()), adapter_dtypes=adapter_dtypes,
                  **flops_per_token(backbone, shape, opts["length"]))

    def step() -> torch.Tensor:
        with amp.forward_context():
            hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            loss = bradley_terry_loss(head(pool_last_token(hidden, mask)), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(opts["warmup"]):  # kernels chosen, allocator warm: left out of every number
        timed(dev, step)
    reset_peak_memory(dev)
    times, losses = [], []
    for _ in range(opts["steps"]):
        seconds, loss = timed(dev, step)
        times.append(seconds)
        losses.append(float(loss))
    step_s = median(times)
    tokens_per_s = n * opts["length"] / step_s
    peak, source = peak_tflops(dev, args.peak_tflops)
    memory = peak_memory(dev)
    report.update(step_s=times, median_step_s=step_s, tokens_per_s=tokens_per_s, losses=losses,
                  losses_finite=all(math.isfinite(v) for v in losses), peak_tflops=peak, peak_tflops_source=source,
                  mfu=report["model_flops_per_token"] * tokens_per_s / (peak * 1e12) if peak else None,
                  hfu=report["hardware_flops_per_token"] * tokens_per_s / (peak * 1e12) if peak else None,
                  peak_memory_gib=memory["peak_allocated_gib"], peak_reserved_gib=memory["peak_reserved_gib"],
                  memory_basis=memory["basis"])
    # the covariance pass on one batch, as FinalizeCovariance runs it (no grad, under the same autocast)
    backbone.eval()
    head.eval()
    head.reset_precision()
    with torch.no_grad(), amp.forward_context():
        forward_s, h = timed(dev, lambda: pool_last_token(
            backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state, mask))
        accumulate_s, _ = timed(dev, lambda: head.accumulate(h))
    finalize_s, _ = timed(dev, head.finalize)
    report.update(covariance_forward_s=forward_s, covariance_accumulate_s=accumulate_s,
                  finalize_s=finalize_s, finalize_jitter=float(head.jitter), precision_dtype=str(head.precision.dtype))


if __name__ == "__main__":
    run_stage("pm_step", __doc__, main, add_options)
