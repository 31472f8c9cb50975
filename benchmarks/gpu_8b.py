"""PM training step of an 8B-shaped Llama with LoRA and the SNGP head on one GPU: peak memory, tokens/s, MFU.

Random weights (shape sets the speed, not values), bf16 backbone, LoRA r=16 on every projection, gradient
checkpointing, SNGP head with D = 4096 kept in fp32/fp64. Skips cleanly (and says so) without a CUDA device.

    python benchmarks/gpu_8b.py [--pairs 4 --length 1024 --steps 6]

Writes benchmarks/results/gpu_8b.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step (2x sequences)")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        msg = "skipped: no CUDA device"
        (out / "gpu_8b.json").write_text(json.dumps({"skipped": msg}))
        print(msg)
        return

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    from lit_route.models.pooling import pool_last_token
    from lit_route.preference.losses import bradley_terry_loss
    from lit_route.uncertainty import SNGPHead

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=8192, rope_theta=500000.0)
    device = torch.device("cuda")
    torch.set_default_dtype(torch.bfloat16)
    with device:
        backbone = LlamaModel(config)
    torch.set_default_dtype(torch.float32)
    backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone = get_peft_model(backbone, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    head = SNGPHead(4096, num_features=4096).to(device)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    n = 2 * args.pairs
    ids = torch.randint(0, config.vocab_size, (n, args.length), device=device)
    mask = torch.ones_like(ids)
    labels = torch.cat([torch.ones(args.pairs), torch.zeros(args.pairs)]).to(device)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        loss = bradley_terry_loss(head(pool_last_token(hidden, mask)), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    # covariance pass step (no grad) and the finalisation of a D = 4096 precision in float64
    with torch.no_grad():
        head.accumulate(pool_last_token(backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state, mask))
        torch.cuda.synchronize()
        t = time.perf_counter()
        head.finalize()
        torch.cuda.synchronize()
        finalize_s = time.perf_counter() - t
    step = statistics.median(times[1:])
    tokens_per_s = n * args.length / step
    n_params = sum(p.numel() for p in backbone.parameters())
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    # frozen weights need no weight gradients: forward 2N, backward 2N, recomputation 2N FLOPs per token
    flops_per_token = 6 * n_params
    result = {
        "device": name, "params": n_params, "pairs": args.pairs, "length": args.length, "median_step_s": step,
        "tokens_per_s": tokens_per_s, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "mfu": (flops_per_token * tokens_per_s / (peak * 1e12)) if peak else None, "finalize_d4096_s": finalize_s,
    }
    (out / "gpu_8b.json").write_text(json.dumps(result, indent=2))
    md = "\n".join(["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in result.items()])
    (out / "gpu_8b.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
