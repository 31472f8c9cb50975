"""Encoding a pair ``(x, a, b)`` into one token sequence whose last token is pooled.

With a chat template, the context is rendered as the conversation it is, and the two responses as two turns
with the roles ``response_a`` and ``response_b`` (ChatML and Llama-3 style templates render any role name).
Without one, the plain template is::

    Prompt:
    {x}

    Response A:
    {a}

    Response B:
    {b}

    Which response is better?

Each piece is tokenised on its own so that truncation can work per part: when the sequence is too long, the
longest part is shortened first (water-filling), the context from its start (older turns go first) and each
response from its end. The fixed template text, and so the pooled final token, is never cut.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lit_route.types import Message, PreferencePair

log = logging.getLogger(__name__)

_SLOT = "\u27e6SLOT{}\u27e7"  # ⟦SLOT0⟧: text no real message contains
ROLE_A, ROLE_B = "response_a", "response_b"

PLAIN_TEMPLATE = ("Prompt:\n", "\n\nResponse A:\n", "\n\nResponse B:\n", "\n\nWhich response is better?")


@dataclass
class EncodedPair:
    """Token ids of one ordered pair and whether anything was cut."""

    input_ids: list[int]
    truncated: bool


def water_fill(lengths: Sequence[int], budget: int) -> list[int]:
    """Largest per-part caps with ``sum(min(len_i, cap)) <= budget``: the longest parts are shortened first.

    Args:
        lengths: Token counts of the truncatable parts.
        budget: Tokens available to them.

    Returns:
        The kept length of each part.
    """
    if sum(lengths) <= budget:
        return list(lengths)
    lo, hi = 0, max(lengths)
    while lo < hi:  # largest cap that fits
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    kept = [min(n, lo) for n in lengths]
    # hand the leftover tokens (fewer than the number of capped parts) to the capped parts in order
    spare = budget - sum(kept)
    for i, n in enumerate(lengths):
        if spare <= 0:
            break
        if n > kept[i]:
            kept[i] += 1
            spare -= 1
    return kept


class PairEncoder:
    """Turns preference pairs into token sequences for the preference model.

    Args:
        tokenizer: A Hugging Face tokenizer.
        max_length: Maximum sequence length; longer pairs are truncated as described in the module docstring.
        template: ``auto`` (the chat template when the tokenizer has one that accepts the response roles),
            ``chat`` or ``plain``.
    """

    def __init__(self, tokenizer, max_length: int = 1024, template: str = "auto"):
        if template not in ("auto", "chat", "plain"):
            raise ValueError(f"template: expected auto, chat or plain, got {template!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.template = template
        if template == "chat" and not self._chat_ok():
            raise ValueError("template: 'chat' requested but the tokenizer's chat template cannot render the pair")
        self.use_chat = template == "chat" or (template == "auto" and self._chat_ok())
        self.n_truncated = 0
        self.n_encoded = 0

    def _chat_ok(self) -> bool:
        if not getattr(self.tokenizer, "chat_template", None):
            return False
        try:
            self._render([{"role": "user", "content": "x"}])
        except Exception as err:  # a template that rejects custom roles raises its own error types
            log.info("chat template cannot render response roles (%s); using the plain template", err)
            return False
        return True

    def _render(self, context: list[Message]) -> tuple[list[str], list[int]]:
        """Renders the template with slot markers; returns the fixed text pieces and which slot follows each."""
        messages = [{"role": m["role"], "content": _SLOT.format(i)} for i, m in enumerate(context)]
        n = len(context)
        messages += [{"role": ROLE_A, "content": _SLOT.format(n)}, {"role": ROLE_B, "content": _SLOT.format(n + 1)}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        pieces, order = [], []
        for i in range(n + 2):
            marker = _SLOT.format(i)
            if text.count(marker) != 1:
                raise ValueError(f"chat template renders slot {i} {text.count(marker)} times")
        rest = text
        while True:
            positions = [(rest.find(_SLOT.format(i)), i) for i in range(n + 2) if _SLOT.format(i) in rest]
            if not positions:
                break
            pos, slot = min(positions)
            pieces.append(rest[:pos])
            order.append(slot)
            rest = rest[pos + len(_SLOT.format(slot)) :]
        if order[-2:] != [n, n + 1]:
            raise ValueError("chat template does not place the two responses last")
        pieces.append(rest.rstrip())
        return pieces, order

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, prompt: str | Sequence[Message], first: str, second: str) -> EncodedPair:
        """Encodes the ordered pair (``first`` shown as response A, ``second`` as response B)."""
        context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if self.use_chat:
            pieces, order = self._render(context)
            contents = [m["content"] for m in context] + [first, second]
        else:
            pieces = list(PLAIN_TEMPLATE)
            order = [0, 1, 2]
            text = context[0]["content"] if len(context) == 1 else PreferencePair(tuple(context), "-", "-").prompt_text()
            contents = [text, first, second]
        fixed = [self._ids(p) for p in pieces]
        slots = {slot: self._ids(contents[slot]) for slot in order}
        n_ctx = len(contents) - 2
        budget = self.max_length - sum(len(f) for f in fixed)
        if budget < 3:
            raise ValueError(f"max_length={self.max_length} leaves no room for content after the template")
        ctx_len = sum(len(slots[i]) for i in range(n_ctx))
        keep_ctx, keep_a, keep_b = water_fill([ctx_len, len(slots[n_ctx]), len(slots[n_ctx + 1])], budget)
        truncated = (keep_ctx, keep_a, keep_b) != (ctx_len, len(slots[n_ctx]), len(slots[n_ctx + 1]))
        # the context loses its oldest tokens first; responses keep their beginning
        drop = ctx_len - keep_ctx
        for i in range(n_ctx):
            cut = min(drop, len(slots[i]))
            slots[i] = slots[i][cut:]
            drop -= cut
        slots[n_ctx] = slots[n_ctx][:keep_a]
        slots[n_ctx + 1] = slots[n_ctx + 1][:keep_b]
        ids: list[int] = []
        for piece, slot in zip(fixed, order, strict=False):
            ids += piece + slots[slot]
        ids += fixed[-1]
        self.n_encoded += 1
        self.n_truncated += int(truncated)
        return EncodedPair(ids, truncated)

    def encode_both(self, pair: PreferencePair) -> tuple[EncodedPair, EncodedPair]:
        """``(x, chosen, rejected)`` and ``(x, rejected, chosen)``."""
        return self.encode(pair.prompt, pair.chosen, pair.rejected), self.encode(pair.prompt, pair.rejected, pair.chosen)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads token lists into ``input_ids`` and ``attention_mask`` of shape (N, L)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}
