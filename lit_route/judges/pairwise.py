"""Judging a pair ``(x, y)`` with control over display order, so position bias cannot pass for a preference.

``order``:

- ``fixed``: ``x`` is shown as A;
- ``random``: a seeded coin per pair decides which is shown first;
- ``both``: two calls, one per order; agreement gives the verdict, disagreement a tie flagged ``inconsistent``.
  If one of the two calls fails, the other decides.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lit_route.judges.cache import shared_copy
from lit_route.types import JudgeRequest, Preference, Verdict

ORDERS = ("fixed", "random", "both")


@dataclass(frozen=True)
class PairJudgement:
    """A judge's view of ``x`` versus ``y``.

    Attributes:
        score: 1.0 when ``x`` is better, 0.0 when ``y`` is, 0.5 for a tie; ``None`` when every call failed.
        failure: The failure reason when ``score`` is ``None``.
        inconsistent: With ``order="both"``, the two display orders disagreed.
        verdicts: The underlying verdicts (one or two).
    """

    score: float | None
    failure: str | None = None
    inconsistent: bool = False
    verdicts: tuple[Verdict, ...] = ()

    @property
    def latency_s(self) -> float:
        """Judge time of the verdicts (as first paid for, cached ones included)."""
        return sum(v.latency_s for v in self.verdicts)

    @property
    def tokens(self) -> int:
        """Tokens of the verdicts (as first paid for, cached ones included)."""
        return sum(v.input_tokens + v.output_tokens for v in self.verdicts)

    @property
    def cost_usd(self) -> float:
        """What was paid now: cached verdicts cost nothing."""
        return sum(v.cost_usd for v in self.verdicts if not v.cached)

    @property
    def verdict_cost_usd(self) -> float:
        """What the verdicts cost when they were paid (cached ones included): the price of this judgement."""
        return sum(v.cost_usd for v in self.verdicts)

    @property
    def billed(self) -> int:
        """Requests billed now (answered with a completion; retries after 429/5xx are not billed)."""
        return sum(v.billed for v in self.verdicts)

    @property
    def requests(self) -> int:
        """Requests sent now, retries and re-asks included."""
        return sum(v.requests for v in self.verdicts)

    @property
    def cached(self) -> int:
        """Verdicts served from the cache."""
        return sum(v.cached for v in self.verdicts)


def _score(verdict: Verdict, swapped: bool) -> float | None:
    if verdict.preference is None:
        return None
    if verdict.preference is Preference.TIE:
        return 0.5
    x_first = not swapped
    return 1.0 if (verdict.preference is Preference.A) == x_first else 0.0


async def judge_pairs(
    backend, items: Sequence[tuple[str, str, str]], order: str = "both", seed: int = 0,
    on_verdict: Callable[[int], object] | None = None,
) -> list[PairJudgement]:
    """Judges ``(prompt, x, y)`` items; the score is from ``x``'s side.

    Args:
        backend: A :class:`~lit_route.judges.JudgeBackend`.
        items: ``(prompt, x, y)`` triples.
        order: ``fixed``, ``random`` or ``both``.
        seed: Seed of the ``random`` order (per-item coins are a function of seed and position).
        on_verdict: Called with the number of requests answered as each verdict arrives (a progress bar);
            requests then go to the backend one per call, concurrently (the backend's own limits bound how many
            are in flight).

    Identical requests (the same pair twice, in the same display order) are sent once; the repeats get a copy of
    the verdict that cost nothing.
    """
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    requests: list[JudgeRequest] = []
    plan: list[list[tuple[int, bool]]] = []
    rng = random.Random(seed)
    for prompt, x, y in items:
        swaps = [False, True] if order == "both" else [rng.random() < 0.5] if order == "random" else [False]
        slots = []
        for swapped in swaps:
            slots.append((len(requests), swapped))
            requests.append(JudgeRequest(prompt, y if swapped else x, x if swapped else y))
        plan.append(slots)
    first: dict[tuple[str, str, str], int] = {}
    for i, r in enumerate(requests):
        first.setdefault((r.prompt, r.response_a, r.response_b), i)
    distinct = [requests[i] for i in first.values()]
    repeats = collections.Counter((r.prompt, r.response_a, r.response_b) for r in requests)
    if on_verdict is None:
        answers = await backend.judge(distinct) if distinct else []
    else:
        async def one(request: JudgeRequest) -> Verdict:
            (verdict,) = await backend.judge([request])
            on_verdict(repeats[request.prompt, request.response_a, request.response_b])
            return verdict

        answers = list(await asyncio.gather(*(one(r) for r in distinct)))
    by_first = dict(zip(first.values(), answers, strict=True))
    verdicts = [by_first[i] if i in by_first else shared_copy(by_first[first[r.prompt, r.response_a, r.response_b]])
                for i, r in enumerate(requests)]
    out = []
    for slots in plan:
        vs = tuple(verdicts[i] for i, _ in slots)
        scores = [_score(verdicts[i], swapped) for i, swapped in slots]
        valid = [s for s in scores if s is not None]
        if not valid:
            out.append(PairJudgement(None, failure=vs[-1].failure or "failed", verdicts=vs))
        elif len(valid) == 2 and valid[0] != valid[1]:
            out.append(PairJudgement(0.5, inconsistent=True, verdicts=vs))
        else:
            out.append(PairJudgement(valid[0], verdicts=vs))
    return out
