"""RLOO advantages and the per-sequence KL penalty."""

from __future__ import annotations

import torch


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages ``A_i = r_i − mean_{j≠i} r_j = K/(K−1) · (r_i − mean_j r_j)``.

    Args:
        rewards: (B, K) rewards of K samples per prompt (K ≥ 2).

    Returns:
        (B, K) advantages; each row sums to zero.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    baseline = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


def kl_per_sequence(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-sequence KL(π‖π_ref) estimated from samples of π, summed over completion tokens.

    Args:
        logp: (N, T) log-probabilities of the sampled tokens under the policy.
        ref_logp: (N, T) under the reference.
        mask: (N, T) 1 on completion tokens.
        estimator: ``k1`` (``log π − log π_ref``; unbiased, can be negative) or ``k3``
            (``exp(Δ) − Δ − 1`` with ``Δ = log π_ref − log π``; unbiased, never negative).

    Returns:
        (N,) KL estimates.
    """
    delta = ref_logp - logp
    if estimator == "k1":
        per_token = -delta
    elif estimator == "k3":
        per_token = torch.expm1(delta) - delta
    else:
        raise ValueError(f"kl_estimator: expected 'k1' or 'k3', got {estimator!r}")
    return (per_token * mask).sum(-1)


def whiten(values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over all entries (a single entry stays as is, centred)."""
    if values.numel() < 2:
        return values - values.mean()
    return (values - values.mean()) / (values.std() + eps)
