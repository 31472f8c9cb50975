"""Pooling the hidden state of the last real token."""

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
