"""Holding out validation pairs by prompt: every pair of one prompt lands on the same side of the split.

Preference sets hold several pairs per prompt (RMB: 14.5k pairs over 2.6k prompts). A split by pair puts most
held-out prompts in training too, so held-out accuracy, and whatever is fitted on the held-out pairs (P(wrong)
curves, Laplace's validation prior), measures near-training data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence


def prompt_key(prompt: str | None, messages: Sequence[dict] | None) -> str:
    """One string per distinct prompt, whether given as text or as a conversation."""
    if prompt is not None:
        return prompt
    return json.dumps(list(messages or []), sort_keys=True, ensure_ascii=False)


def split_by_prompt(keys: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Splits pair indices so that no prompt is on both sides.

    The distinct prompts, in order of first appearance, are shuffled with ``seed``; the first
    ``max(1, round(fraction · n_prompts))`` of them are held out. With one pair per prompt this is the split by
    pair (the same pairs held out for the same seed).

    Args:
        keys: (N,) the prompt key of each pair (:func:`prompt_key`).
        fraction: Share of the prompts held out, in (0, 1).
        seed: Seed of the shuffle.

    Returns:
        ``(train, val)``: sorted pair indices.

    Raises:
        ValueError: the prompts are too few to leave one for training.
    """
    prompts = list(dict.fromkeys(keys))
    random.Random(seed).shuffle(prompts)
    n_val = max(1, round(len(prompts) * fraction))
    if n_val >= len(prompts):
        raise ValueError(f"data.val_fraction: {len(keys)} pairs over {len(prompts)} prompt(s) leave no training "
                         "prompt once validation prompts are held out; give data.val or set data.val_fraction 0")
    held = set(prompts[:n_val])
    val = [i for i, k in enumerate(keys) if k in held]
    train = [i for i, k in enumerate(keys) if k not in held]
    return train, val
