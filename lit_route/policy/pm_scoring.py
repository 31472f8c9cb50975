"""Scoring every pair of each group of K completions with the preference model."""

from __future__ import annotations

import torch

from lit_route.data.encoding import PairEncoder, pad_batch
from lit_route.rewards.pairwise import upper_pairs


def load_reward_pm(pm_ckpt: str | None, pm_backbone=None):
    """The frozen reward PM and its encoder: from a finalised checkpoint, or (debugging) an untrained SNGP PM
    whose covariance is the prior."""
    if pm_ckpt is None and pm_backbone is None:
        raise ValueError("pm_ckpt: no reward model given; pass a finalised PM checkpoint "
                         "(or pm_backbone for an untrained PM, for debugging only)")
    if pm_ckpt is not None:
        from lit_route.preference.io import load_preference_model

        pm, encoder = load_preference_model(pm_ckpt)
    else:
        from lit_route.preference.module import PreferenceModule, SNGPConfig

        pm = PreferenceModule(backbone=pm_backbone, sngp=SNGPConfig(num_features=128))
        pm.head.finalize()  # no data: covariance = prior
        encoder = PairEncoder(pm.tokenizer, max_length=512)
    pm.eval().requires_grad_(False)
    return pm, encoder


@torch.no_grad()
def score_groups(pm, encoder: PairEncoder, prompts: list, completions: list[list[str]], batch_size: int = 16):
    """S (B, K, K) antisymmetric and U (B, K, K) symmetric from the PM, both orders of a pair in one batch.

    Only the K(K−1)/2 unordered pairs are encoded (each in both orders, as ``score_batch`` expects): the
    K(K−1) ordered sequences, no more. (A pointwise PM encodes each pair's two responses instead.)
    """
    b, k = len(completions), len(completions[0])
    ii, jj = upper_pairs(k)
    jobs = [(bi, int(i), int(j)) for bi in range(b) for i, j in zip(ii.tolist(), jj.tolist(), strict=True)]
    device = next(pm.parameters()).device
    s = torch.zeros(b, k, k)
    u = torch.zeros(b, k, k)
    pad = pm.tokenizer.pad_token_id
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        encoded = [encoder.encode_orders(prompts[bi], completions[bi][i], completions[bi][j]) for bi, i, j in chunk]
        first = [e[0].input_ids for e in encoded]
        second = [e[1].input_ids for e in encoded]
        batch = {key: t.to(device) for key, t in pad_batch(first + second, pad).items()}
        d, unc = pm.score_batch(batch)
        for (bi, i, j), dv, uv in zip(chunk, d.float().cpu().tolist(), unc.float().cpu().tolist(), strict=True):
            s[bi, i, j], s[bi, j, i] = dv, -dv
            u[bi, i, j] = u[bi, j, i] = uv
    return s, u
