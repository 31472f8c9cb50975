"""The policy-gradient loss: REINFORCE with RLOO advantages, or PPO-style clipping when a batch is reused."""

from __future__ import annotations

import torch


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float | None = None, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Token-level policy-gradient loss.

    With ``clip_eps=None`` this is REINFORCE: ``−A · Σ_t log π(y_t)`` averaged over completion tokens (the
    ratio form ``−A · π/π_old`` has the same gradient at ``π = π_old``). With ``clip_eps`` it is PPO's clipped
    surrogate, for the second and later updates on one batch.

    Args:
        logp: (N, T) log-probs under the current policy (with grad).
        old_logp: (N, T) log-probs when the batch was sampled (no grad).
        advantages: (N,) sequence advantages.
        mask: (N, T) completion mask.
        clip_eps: PPO clip range, or ``None``.
        token_weights: (N, T) per-token weights (truncated importance sampling of an engine's samples), or ``None``.

    Returns:
        Scalar loss.
    """
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.detach().unsqueeze(-1)
    surrogate = ratio * adv
    if clip_eps is not None:
        surrogate = torch.minimum(surrogate, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if token_weights is not None:
        surrogate = surrogate * token_weights.detach()
    return -(surrogate * mask).sum() / mask.sum().clamp_min(1.0)
