"""Pooling a sequence's hidden states into one feature: the last real token's, or their mean."""

from __future__ import annotations

import torch


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding.

    Args:
        attention_mask: (B, L) with 1 for real tokens.

    Returns:
        (B,) long indices.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


def pool_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Gathers ``hidden[b, last_real(b)]``.

    Args:
        hidden: (B, L, H) final hidden states (after the final norm).
        attention_mask: (B, L).

    Returns:
        (B, H).
    """
    idx = last_token_index(attention_mask)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def pool_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` over each row's real tokens.

    Args:
        hidden: (B, L, H) hidden states.
        attention_mask: (B, L), 1 for real tokens (left or right padding).

    Returns:
        (B, H).
    """
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


POOLINGS = {"last_token": pool_last_token, "mean": pool_mean}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str = "last_token") -> torch.Tensor:
    """(B, L, H) -> (B, H) by ``how``: ``last_token`` (the last real token) or ``mean`` (over the real tokens)."""
    if how not in POOLINGS:
        raise ValueError(f"pooling: expected one of {sorted(POOLINGS)}, got {how!r}")
    return POOLINGS[how](hidden, attention_mask)
