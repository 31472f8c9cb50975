"""The metrics an RLOO step logs."""

from __future__ import annotations

import torch

from lit_route.policy.pipeline import Rollout


def step_metrics(rollout: Rollout, loss: torch.Tensor, pending: int | None = None) -> dict[str, float]:
    """The step's metrics as plain floats: loss, reward, KL and advantage spread, completion length, the judged
    fraction of the K(K−1)/2 pairs per prompt, the PM's mean uncertainty, the stage timings and the context's
    statistics (engine, routing).

    Args:
        rollout: The trained batch (its KL and advantages filled in).
        loss: The last update's loss.
        pending: Batches left in the reward pipeline, or ``None`` without one (no pipeline metrics then).
    """
    r, ctx = rollout, rollout.ctx
    b, k, _ = ctx.scores.shape
    n_pairs = b * k * (k - 1) / 2
    metrics = {
        "train/loss": loss,
        **({"pipeline/staleness": r.staleness, "pipeline/pending": pending} if pending is not None else {}),
        "reward/mean": r.pm_reward.mean(),
        "reward/std": r.pm_reward.std(),
        "kl/mean": r.kl.mean(),
        "advantage/std": r.advantages.std(),
        "response/length": r.completion_mask.sum(-1).mean(),
        "judge/fraction": ctx.judged.sum().float() / 2 / n_pairs,
        "pm/uncertainty_mean": ctx.uncertainty.sum() / (b * k * (k - 1)),
        **{f"time/{name}": t for name, t in ctx.timings.items()},
        **ctx.stats,
    }
    return {key: float(value) for key, value in metrics.items()}
