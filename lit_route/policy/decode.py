"""A lean sampling loop: prefill once, then one cached forward and one draw per token, nothing else.

``model.generate`` runs a general machinery per token (logits processors, stopping criteria, input preparation,
cache bookkeeping) that costs as much as the forward of a small model on a CPU. RLOO needs only temperature,
top-k, top-p and EOS; this loop does exactly that, reading the logits of the last position only.
"""

from __future__ import annotations

import torch

from lit_route.models.compat import cache_of, with_cache


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(N, V) logits -> (N, V) logits of the sampling distribution: divided by the temperature, then all but the
    ``top_k`` largest (0: off) and all outside the smallest set whose probability reaches ``top_p`` set to −inf."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


@torch.no_grad()
def lean_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  temperature: float, top_k: int, top_p: float, eos_ids: list[int], pad_id: int) -> torch.Tensor:
    """Samples up to ``max_new_tokens`` after left-padded prompts.

    Args:
        input_ids: (N, P) left-padded prompts.
        attention_mask: (N, P).

    Returns:
        (N, T) sampled ids, ``pad_id`` after a row's EOS; T stops early when every row has ended.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1)
    cache = cache_of(out)
    position = position_ids[:, -1:] + 1
    eos = torch.tensor(eos_ids, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        probs = torch.softmax(warp(out.logits[:, -1], temperature, top_k, top_p), dim=-1)
        token = torch.multinomial(probs, 1).squeeze(-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(input_ids=token.unsqueeze(-1), attention_mask=attention_mask, position_ids=position, use_cache=True,
                    **with_cache(cache))
        position = position + 1
    return torch.stack(tokens, dim=1)
