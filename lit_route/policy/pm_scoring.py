"""Scoring every pair of each group of K completions with the preference model."""

from __future__ import annotations

import copy

import torch

from lit_route.data.encoding import PairEncoder, pad_batch
from lit_route.models.compat import cache_of, with_cache
from lit_route.models.pooling import pool_last_token
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


def common_prefix(sequences: list[list[int]]) -> int:
    """Length of the longest prefix all ``sequences`` share, leaving at least one token of each."""
    shortest = min(len(s) for s in sequences)
    first = sequences[0]
    n = 0
    while n < shortest - 1 and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


@torch.no_grad()
def pooled_with_prefix(backbone, sequences: list[list[int]], pad_id: int, prefix_cache, prefix_len: int) -> torch.Tensor:
    """Pooled last-token features of ``sequences`` that all start with the same ``prefix_len`` tokens, whose keys
    and values are ``prefix_cache`` (batch 1): only the rest of each sequence is run."""
    rest = pad_batch([s[prefix_len:] for s in sequences], pad_id)
    device = next(backbone.parameters()).device
    n = len(sequences)
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(n)
    mask = torch.cat([torch.ones(n, prefix_len, dtype=torch.long), rest["attention_mask"]], dim=1)
    positions = prefix_len + torch.arange(rest["input_ids"].shape[1]).expand(n, -1)
    out = backbone(input_ids=rest["input_ids"].to(device), attention_mask=mask.to(device),
                   position_ids=positions.to(device), use_cache=True, **with_cache(cache))
    return pool_last_token(out.last_hidden_state, rest["attention_mask"].to(device))


@torch.no_grad()
def score_groups(pm, encoder: PairEncoder, prompts: list, completions: list[list[str]], batch_size: int = 16,
                 share_prefix: bool = True):
    """S (B, K, K) antisymmetric and U (B, K, K) symmetric from the PM, both orders of a pair in one batch.

    Only the K(K−1)/2 unordered pairs are encoded (each in both orders, as ``score_pooled`` expects): the K(K−1)
    ordered sequences, no more. With ``share_prefix`` the sequences of a group are run from the keys and values of
    the prefix they share (the template and the prompt, computed once per group), so a prompt is read once rather
    than K(K−1) times; the numbers are those of whole sequences, up to float rounding.
    """
    b, k = len(completions), len(completions[0])
    ii, jj = upper_pairs(k)
    s = torch.zeros(b, k, k)
    u = torch.zeros(b, k, k)
    pad = pm.tokenizer.pad_token_id
    device = next(pm.parameters()).device
    pairs = list(zip(ii.tolist(), jj.tolist(), strict=True))
    for bi in range(b):
        encoded = [encoder.encode_orders(prompts[bi], completions[bi][i], completions[bi][j]) for i, j in pairs]
        sequences = [e[0].input_ids for e in encoded] + [e[1].input_ids for e in encoded]
        # a shared prefix is run once for its keys and values: what last-token pooling needs (a mean needs the
        # prefix's hidden states too)
        shared = share_prefix and getattr(pm, "pooling", "last_token") == "last_token"
        prefix_len = common_prefix(sequences) if shared and getattr(pm, "feature_cache", None) is None else 0
        cache = None
        if prefix_len:
            prefix = torch.tensor([sequences[0][:prefix_len]], device=device)
            cache = cache_of(pm.backbone(input_ids=prefix, use_cache=True))
        for start in range(0, len(pairs), batch_size):
            stop = min(start + batch_size, len(pairs))
            chunk = sequences[start:stop] + sequences[len(pairs) + start : len(pairs) + stop]
            if cache is not None:
                h = pooled_with_prefix(pm.backbone, chunk, pad, cache, prefix_len)
            else:
                batch = pad_batch(chunk, pad)
                h = pm.pooled(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            d, unc = pm.score_pooled(h)
            for (i, j), dv, uv in zip(pairs[start:stop], d.float().cpu().tolist(), unc.float().cpu().tolist(),
                                      strict=True):
                s[bi, i, j], s[bi, j, i] = dv, -dv
                u[bi, i, j] = u[bi, j, i] = uv
    return s, u
