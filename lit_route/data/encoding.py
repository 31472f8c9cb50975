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
PLAIN_POINTWISE = ("Prompt:\n", "\n\nResponse:\n", "\n\nIs this response good?")
MODES = ("pairwise", "pointwise")


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
        mode: ``pairwise`` (one sequence holds both responses) or ``pointwise`` (one sequence per response,
            the plain reward-model baseline: the response is the assistant turn).
    """

    def __init__(self, tokenizer, max_length: int = 1024, template: str = "auto", mode: str = "pairwise"):
        if template not in ("auto", "chat", "plain"):
            raise ValueError(f"template: expected auto, chat or plain, got {template!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
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

    @property
    def roles(self) -> tuple[str, ...]:
        return (ROLE_A, ROLE_B) if self.mode == "pairwise" else ("assistant",)

    def _render(self, context: list[Message]) -> tuple[list[str], list[int]]:
        """Renders the template with slot markers; returns the fixed text pieces and which slot follows each."""
        n, roles = len(context), self.roles
        messages = [{"role": m["role"], "content": _SLOT.format(i)} for i, m in enumerate(context)]
        messages += [{"role": role, "content": _SLOT.format(n + r)} for r, role in enumerate(roles)]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        total = n + len(roles)
        for i in range(total):
            if text.count(_SLOT.format(i)) != 1:
                raise ValueError(f"chat template renders slot {i} {text.count(_SLOT.format(i))} times")
        pieces, order, rest = [], [], text
        while True:
            positions = [(rest.find(_SLOT.format(i)), i) for i in range(total) if _SLOT.format(i) in rest]
            if not positions:
                break
            pos, slot = min(positions)
            pieces.append(rest[:pos])
            order.append(slot)
            rest = rest[pos + len(_SLOT.format(slot)) :]
        if order[-len(roles) :] != list(range(n, total)):
            raise ValueError("chat template does not place the responses last")
        pieces.append(rest.rstrip())
        return pieces, order

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, prompt: str | Sequence[Message], *responses: str) -> EncodedPair:
        """Encodes ``(x, first, second)`` (pairwise: ``first`` shown as response A) or ``(x, response)``
        (pointwise)."""
        if len(responses) != len(self.roles):
            raise ValueError(f"{self.mode} encoding takes {len(self.roles)} response(s), got {len(responses)}")
        context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if self.use_chat:
            pieces, order = self._render(context)
            contents = [m["content"] for m in context] + list(responses)
        else:
            template = PLAIN_TEMPLATE if self.mode == "pairwise" else PLAIN_POINTWISE
            pieces, order = list(template), list(range(1 + len(responses)))
            text = context[0]["content"] if len(context) == 1 else PreferencePair(tuple(context), "-", "-").prompt_text()
            contents = [text, *responses]
        fixed = [self._ids(p) for p in pieces]
        slots = {slot: self._ids(contents[slot]) for slot in order}
        n_ctx = len(contents) - len(responses)
        budget = self.max_length - sum(len(f) for f in fixed)
        if budget < 3:
            raise ValueError(f"max_length={self.max_length} leaves no room for content after the template")
        ctx_len = sum(len(slots[i]) for i in range(n_ctx))
        lengths = [ctx_len] + [len(slots[n_ctx + r]) for r in range(len(responses))]
        kept = water_fill(lengths, budget)
        truncated = kept != lengths
        # the context loses its oldest tokens first; responses keep their beginning
        drop = ctx_len - kept[0]
        for i in range(n_ctx):
            cut = min(drop, len(slots[i]))
            slots[i] = slots[i][cut:]
            drop -= cut
        for r in range(len(responses)):
            slots[n_ctx + r] = slots[n_ctx + r][: kept[1 + r]]
        ids: list[int] = []
        for piece, slot in zip(fixed, order, strict=False):
            ids += piece + slots[slot]
        ids += fixed[-1]
        self.n_encoded += 1
        self.n_truncated += int(truncated)
        return EncodedPair(ids, truncated)

    def encode_orders(self, prompt, a: str, b: str) -> tuple[EncodedPair, EncodedPair]:
        """The two sequences a pair needs: ``(x, a, b)`` and ``(x, b, a)`` (pairwise) or ``(x, a)`` and ``(x, b)``
        (pointwise). Scores come out as ``d(a, b)`` either way."""
        if self.mode == "pairwise":
            return self.encode(prompt, a, b), self.encode(prompt, b, a)
        return self.encode(prompt, a), self.encode(prompt, b)

    def encode_both(self, pair: PreferencePair) -> tuple[EncodedPair, EncodedPair]:
        """The two sequences of ``(chosen, rejected)``; see :meth:`encode_orders`."""
        return self.encode_orders(pair.prompt, pair.chosen, pair.rejected)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads token lists into ``input_ids`` and ``attention_mask`` of shape (N, L)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}
