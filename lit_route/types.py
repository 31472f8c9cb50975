"""Small frozen records shared by every stage."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union

Message = dict[str, str]
"""A chat message: ``{"role": ..., "content": ...}``."""

Prompt = Union[str, tuple[Message, ...]]
"""A prompt is plain text or a conversation (the context before the two responses)."""


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: ``chosen`` is preferred over ``rejected`` for ``prompt``.

    Attributes:
        prompt: The context, as text or as a tuple of chat messages (the last one is usually the user's).
        chosen: The preferred response.
        rejected: The other response.
        subset: Where the pair comes from (benchmark section, RM-Bench difficulty, ...).
        id: A stable identifier, unique within its file.
        strength: Optional preference strength used as a loss weight (1.0 when absent).
    """

    prompt: Prompt
    chosen: str
    rejected: str
    subset: str = ""
    id: str = ""
    strength: float | None = None

    def prompt_messages(self) -> list[Message]:
        """The prompt as a list of chat messages (plain text becomes one user turn)."""
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [dict(m) for m in self.prompt]

    def prompt_text(self) -> str:
        """The prompt as plain text (a conversation is rendered as ``Role: content`` lines)."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in self.prompt)


class Preference(str, enum.Enum):
    """What a judge preferred, in display positions."""

    A = "A"
    B = "B"
    TIE = "tie"


@dataclass(frozen=True)
class JudgeRequest:
    """What a judge is asked: which of two responses to ``prompt`` is better.

    ``response_a`` is shown first. Callers that care about position bias ask in both orders.
    """

    prompt: str
    response_a: str
    response_b: str
    id: str = ""


@dataclass(frozen=True)
class Verdict:
    """A judge's answer to one :class:`JudgeRequest`.

    Attributes:
        preference: ``A``, ``B`` or ``TIE``; ``None`` when the call failed (see ``failure``).
        failure: Why the call failed (``rate_limit``, ``timeout``, ``unparseable``, ``no_record``, ...).
        prob_a: P(A is better) where the backend knows it (log-prob mode), else ``None``.
        raw: The judge's raw final text (empty on transport failures).
        latency_s: Wall time of the call, including retries.
        input_tokens: Prompt tokens billed.
        output_tokens: Completion tokens billed (reasoning included).
        cost_usd: Estimated cost of the call.
        cached: Whether the verdict came from the cache (nothing was sent or paid for it now).
        inconsistent: With ``order="both"``, the two display orders disagreed.
        requests: Requests sent to the backend for this verdict: first attempt, transport retries and re-asks
            after an unparseable answer (0 when cached).
        billed: Those requests that came back with a completion, which is what a provider bills; a 429, a 5xx
            or a dropped connection is a request but not a billed one (0 when cached).
    """

    preference: Preference | None
    failure: str | None = None
    prob_a: float | None = None
    raw: str = ""
    latency_s: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False
    inconsistent: bool = False
    requests: int = 0
    billed: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def ok(self) -> bool:
        return self.preference is not None
