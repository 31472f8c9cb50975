"""Checks on the dtypes an optimiser sees.

An AdamW step on a bfloat16 weight is rounded to the weight's 8-bit mantissa: at the learning rates of LLM
fine-tuning (1e-6 to 1e-4) most of the update of a weight of size ~0.1 is lost. LoRA then barely moves under
``precision: bf16-true``, which converts every parameter to bf16. ``bf16-mixed`` computes in bf16 under autocast
and leaves the trainable weights (peft creates adapters in float32) and the optimiser state in float32.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn

LOW_PRECISION = (torch.bfloat16, torch.float16)


def warn_low_precision_trainables(params: Iterable[torch.nn.Parameter]) -> bool:
    """Warns (once, on rank 0) when trainable parameters are 16-bit floats; returns whether any were."""
    low = sum(p.numel() for p in params if p.requires_grad and p.dtype in LOW_PRECISION)
    if low:
        rank_zero_warn(
            f"{low} trainable parameters are 16-bit floats: optimiser updates below their resolution are lost "
            "(LoRA barely moves at small learning rates) unless the strategy keeps float32 master weights "
            "(DeepSpeed). Use precision: bf16-mixed, which keeps trainable weights and optimiser state in float32."
        )
    return bool(low)
