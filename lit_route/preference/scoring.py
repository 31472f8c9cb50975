"""``score_pairs``: batched, no-grad scoring of preference pairs in both orders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from lit_route.data.encoding import PairEncoder, pad_batch
from lit_route.types import PreferencePair


@torch.no_grad()
def score_pairs(
    module,
    pairs: Sequence[PreferencePair],
    encoder: PairEncoder | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores each pair as ``d(chosen, rejected)`` with its uncertainty ``ū``.

    Both orders of a pair go through the model in the same batch. Pairs are batched by length (longest first)
    so padding is small, and the results are returned in the input order.

    Args:
        module: A :class:`~lit_route.preference.PreferenceModule`.
        pairs: The pairs to score.
        encoder: Pair encoder (default: the module's tokenizer, ``max_length=1024``).
        batch_size: Pairs per forward pass (2× sequences).
        device: Where to run (default: the module's device).
        progress: Show a progress bar.

    Returns:
        ``(d, ū)``: float32 tensors of shape (N,) on the CPU.
    """
    encoder = encoder or PairEncoder(module.tokenizer, max_length=1024)
    if device is not None:
        module = module.to(device)
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    encoded = [encoder.encode_both(p) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(encoded[i][0].input_ids) - len(encoded[i][1].input_ids))
    d = torch.empty(len(pairs))
    u = torch.empty(len(pairs))
    pad = module.tokenizer.pad_token_id
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="scoring pairs", disable=not progress, unit="batch"):
        seqs = [encoded[i][0].input_ids for i in idx] + [encoded[i][1].input_ids for i in idx]
        batch = {k: v.to(device) for k, v in pad_batch(seqs, pad).items()}
        bd, bu = module.score_batch(batch)
        d[idx] = bd.float().cpu()
        u[idx] = bu.float().cpu()
    module.train(was_training)
    if hasattr(module, "flush_feature_cache"):  # features computed here are kept for the next run
        module.flush_feature_cache()
    return d, u
