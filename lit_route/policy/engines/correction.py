"""The engine–trainer log-probability gap and truncated importance sampling for it (pure functions).

An inference engine's kernels differ from the trainer's, and a stale or wrongly synced adapter differs much more;
the gap over the sampled tokens says which. When the engine's sampling distribution μ differs from the
trainer's π_old, the policy gradient estimated on μ's samples is off by π_old/μ per token; truncated importance
sampling (TIS, as TRL's ``vllm_importance_sampling_correction`` in its ``token_truncate`` mode) weights each
token's loss by ``min(π_old/μ, C)``.

Both take log-probs of one distribution on both sides: with top-k or top-p, μ is the engine's truncated and
renormalised distribution and π_old must be the trainer's version of the same truncation
(:func:`~lit_route.policy.sampling.nucleus_logprobs`). The untruncated π_old would put the nucleus' mass
(−ln 0.95 = 0.0513 per token at ``top_p = 0.95``) into every gap and every weight.
"""

from __future__ import annotations

import torch


def logprob_gap(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean and max |engine − trainer| log-prob over the sampled tokens.

    Args:
        engine_logp: (N, T) the engine's log-probs of its sampled tokens.
        trainer_logp: (N, T) the trainer's log-probs of the same tokens.
        mask: (N, T) completion tokens.

    Returns:
        ``(mean, max)``; ``(0, 0)`` when there is no token.
    """
    diff = (engine_logp.float() - trainer_logp.float()).abs() * mask
    n = float(mask.sum())
    if n == 0:
        return 0.0, 0.0
    return float(diff.sum()) / n, float(diff.max())


def truncated_is_weights(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """Per-token weights ``min(exp(trainer − engine), cap)`` (0 off the mask).

    Args:
        trainer_logp: (N, T) log π_old of the sampled tokens.
        engine_logp: (N, T) log μ, the engine's.
        mask: (N, T).
        cap: Upper bound C of a weight.

    Returns:
        (N, T) weights, detached.
    """
    ratio = torch.exp((trainer_logp.float() - engine_logp.float()).clamp(max=torch.log(torch.tensor(cap)).item()))
    return (ratio * mask).detach()
