"""GPU check, stage ``bf16_checks``: bf16-mixed against float32 on the same 8B-shaped weights.

One Llama-3-8B-shaped backbone with random float32 weights (bf16-mixed keeps float32 weights and computes in bf16
under autocast) and the SNGP head with D = 4096:

1. the covariance pass and the scores of held-out pairs, once in float32 and once under Lightning's bf16-mixed
   autocast: the scores d, the GP variances σ² and the uncertainties ū of the two runs must agree within
   :data:`TOLERANCES`;
2. each run's precision matrix: float64, Cholesky without jitter, smallest eigenvalue above 0 (the prior alone
   puts it at the ridge, 1), and the cached covariance its inverse;
3. a few LoRA + head training steps under bf16-mixed on one fixed batch: the loss finite at every step and lower
   at the end than at the start.

Sequences are random tokens of random lengths, right-padded, so that padding masks and last-token pooling run.
The float32 reference is true float32 (TF32 matmuls off).

    python benchmarks/gpu_precision.py --json runs/gpu_precision.json
"""

from __future__ import annotations

import contextlib
import math

import torch
from gpu_common import device, device_name, run_stage
from gpu_shapes import model_shape, random_model

from lit_route.models.backbone import LoraSpec, apply_lora
from lit_route.models.pooling import pool_last_token
from lit_route.preference.losses import antisymmetric_score, bradley_terry_loss
from lit_route.uncertainty import SNGPHead

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULTS = {"fit_pairs": (16, 8), "eval_pairs": (8, 4), "train_pairs": (4, 2), "length": (256, 24),
            "train_steps": (6, 4), "features": (4096, 64), "batch": (16, 16)}
# bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2% per operand); autocast rounds the inputs of every
# matmul while the residual stream, the norms and the SNGP head stay float32. On a CPU the pooled features of
# random Llamas differed by 1.4% (width 1024, 32 layers) and 1.5% (width 4096, 2 layers), the scores by 1.1% and
# 1.3%, the variances by under 0.1%: the limits leave room above that for the GPU's kernels and the full depth.
TOLERANCES = {
    "feature_rel_l2": 0.05,  # ‖h_bf16 − h_fp32‖ / ‖h_fp32‖ over the pooled features
    "score_rel_l2": 0.10,  # ‖d_bf16 − d_fp32‖ / ‖d_fp32‖ over the held-out pairs
    "variance_rel_max": 0.05,  # max |σ²_bf16 − σ²_fp32| / max σ²_fp32
    "uncertainty_abs_max": 0.01,  # max |ū_bf16 − ū_fp32| (ū ≥ 1)
    "inverse_residual_max": 1e-6,  # max |P Σ − I| of the float64 precision P and its cached inverse Σ
}


def add_options(parser) -> None:
    for name, (real, dry) in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=int, default=None, help=f"default {real} (dry run {dry})")


def random_pairs(n_pairs: int, length: int, vocab: int, dev: torch.device, seed: int):
    """Both orders of ``n_pairs`` pairs as 2·n_pairs right-padded rows of random tokens and random lengths in
    [length/2, length]: ``(ids, mask, labels)`` of shapes (2n, L), (2n, L), (2n,)."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * n_pairs
    lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
    ids = torch.randint(0, vocab, (n, length), generator=gen)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    labels = torch.cat([torch.ones(n_pairs), torch.zeros(n_pairs)])
    return ids.mul(mask).to(dev), mask.to(dev), labels.to(dev)


def covariance_checks(head: SNGPHead) -> dict:
    """The finalised precision P (float64): its Cholesky and eigenvalues, and how well Σ inverts it."""
    p, cov = head.precision, head.covariance
    _, info = torch.linalg.cholesky_ex(p)
    eig = torch.linalg.eigvalsh(p)
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    out = {"dtype": str(p.dtype), "covariance_dtype": str(cov.dtype), "cholesky_info": int(info),
           "jitter": float(head.jitter), "min_eigenvalue": float(eig.min()), "max_eigenvalue": float(eig.max()),
           "inverse_residual": float((p @ cov - eye).abs().max()),
           "symmetry_residual": float((cov - cov.t()).abs().max())}
    out["ok"] = (out["dtype"] == out["covariance_dtype"] == "torch.float64" and out["cholesky_info"] == 0
                 and out["jitter"] == 0.0 and out["min_eigenvalue"] > 0.0
                 and out["inverse_residual"] <= TOLERANCES["inverse_residual_max"])
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main(args, report) -> None:
    opts = {name: pair[1 if args.dry_run else 0] if getattr(args, name) is None else getattr(args, name)
            for name, pair in DEFAULTS.items()}
    from lightning.fabric.plugins.precision import MixedPrecision

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")  # the reference must be float32, not TF32
    dev = device(args.dry_run)
    shape = model_shape(args.dry_run)
    report.update(device=device_name(dev), shape=shape, **opts, tolerances=TOLERANCES)
    amp = MixedPrecision("bf16-mixed", dev.type)
    model = random_model(shape, dev, torch.float32).eval()
    head = SNGPHead(shape["hidden_size"], num_features=opts["features"]).to(dev).eval()
    vocab = shape["vocab_size"]

    def precision(mixed: bool):
        return amp.forward_context() if mixed else contextlib.nullcontext()

    @torch.no_grad()
    def pooled(ids, mask, mixed: bool) -> torch.Tensor:
        out = []
        for i in range(0, ids.shape[0], opts["batch"]):
            rows = slice(i, i + opts["batch"])
            with precision(mixed):
                hidden = model(input_ids=ids[rows], attention_mask=mask[rows], use_cache=False).last_hidden_state
            out.append(pool_last_token(hidden, mask[rows]).float())
        return torch.cat(out)

    fit = random_pairs(opts["fit_pairs"], opts["length"], vocab, dev, seed=1)
    held_out = random_pairs(opts["eval_pairs"], opts["length"], vocab, dev, seed=2)
    features = {mixed: (pooled(*fit[:2], mixed), pooled(*held_out[:2], mixed)) for mixed in (False, True)}
    # the length-scale is part of the trained head: one value (the median heuristic on float32 features) for both
    head.set_length_scale(head.project(features[False][0]), twin_offset=opts["fit_pairs"])
    runs = {}
    for name, mixed in (("fp32", False), ("bf16_mixed", True)):
        h_fit, h_eval = features[mixed]
        head.reset_precision()
        with precision(mixed):  # the covariance pass runs under the Trainer's autocast
            head.accumulate(h_fit)
        head.finalize()
        with torch.no_grad(), precision(mixed):
            p, u = head.predict(h_eval)
            variance = head.variance(h_eval)
        b = p.shape[0] // 2
        d = antisymmetric_score(p[:b], p[b:])
        runs[name] = {"d": d.double().cpu(), "u": head.pair_uncertainty(d, u[:b], u[b:]).double().cpu(),
                      "variance": variance.double().cpu(), "covariance": covariance_checks(head)}
    f32, b16 = runs["fp32"], runs["bf16_mixed"]
    measured = {
        "feature_rel_l2": max(rel(features[True][i], features[False][i]) for i in (0, 1)),
        "score_rel_l2": rel(b16["d"], f32["d"]),
        "variance_rel_max": float((b16["variance"] - f32["variance"]).abs().max() / f32["variance"].abs().max()),
        "uncertainty_abs_max": float((b16["u"] - f32["u"]).abs().max()),
    }
    agreement = {k: {"measured": v, "limit": TOLERANCES[k], "ok": v <= TOLERANCES[k]} for k, v in measured.items()}
    report.update(agreement=agreement,
                  scores={"fp32": f32["d"].tolist(), "bf16_mixed": b16["d"].tolist()},
                  variances={"fp32": f32["variance"].tolist(), "bf16_mixed": b16["variance"].tolist()},
                  covariance={"fp32": f32["covariance"], "bf16_mixed": b16["covariance"]})
    report.update(training=train_steps(model, head, amp, opts, vocab, dev))
    checks = {f"agreement.{k}": v["ok"] for k, v in agreement.items()}
    checks.update({f"covariance.{k}": runs[k]["covariance"]["ok"] for k in runs})
    checks.update({"training.loss_finite": report["training"]["finite"],
                   "training.loss_decreasing": report["training"]["decreasing"]})
    report.update(checks=checks, all_checks_ok=all(checks.values()))


def train_steps(model, head, amp, opts: dict, vocab: int, dev: torch.device) -> dict:
    """LoRA (float32 adapters) and the head trained under bf16-mixed on one fixed batch, as the Trainer runs a
    step: forward under autocast, backward and AdamW outside it."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, LoraSpec(r=16, alpha=32, target_modules=PROJECTIONS))
    model.train()
    head.train()
    adapters = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": adapters, "lr": 1e-4}, {"params": list(head.parameters()), "lr": 3e-3}])
    ids, mask, labels = random_pairs(opts["train_pairs"], opts["length"], vocab, dev, seed=3)
    losses = []
    for _ in range(opts["train_steps"]):
        with amp.forward_context():
            hidden = model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            loss = bradley_terry_loss(head(pool_last_token(hidden, mask)), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    half = len(losses) // 2
    return {"losses": losses, "adapter_dtypes": sorted({str(p.dtype) for p in adapters}),
            "finite": all(math.isfinite(v) for v in losses),
            "decreasing": losses[-1] < losses[0] and sum(losses[-half:]) < sum(losses[:half])}


if __name__ == "__main__":
    run_stage("bf16_checks", __doc__, main, add_options)
