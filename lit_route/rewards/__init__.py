"""Rewards from pairwise scores: the score matrix, RLOO advantages, the KL penalty (pure functions)."""

from lit_route.rewards.pairwise import (
    ordered_pairs,
    pairwise_rewards,
    score_matrix,
    upper_pairs,
    verdict_logits,
)
from lit_route.rewards.rloo import kl_per_sequence, rloo_advantages, whiten

__all__ = [
    "kl_per_sequence",
    "ordered_pairs",
    "pairwise_rewards",
    "rloo_advantages",
    "score_matrix",
    "upper_pairs",
    "verdict_logits",
    "whiten",
]
