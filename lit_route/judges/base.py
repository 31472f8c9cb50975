"""The judge protocol and the statistics every backend keeps."""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from lit_route.types import Verdict


@runtime_checkable
class JudgeBackend(Protocol):
    """An LLM judge: async and batched. Failures come back as verdicts with ``preference=None``.

    Any class with these members is a judge (the check is structural: no base class to inherit, no annotations
    to copy): ``name`` and ``model`` (strings), ``stats`` (a :class:`JudgeStats`) and ``async judge(requests)``,
    which takes a sequence of :class:`~lit_route.types.JudgeRequest` and returns one
    :class:`~lit_route.types.Verdict` per request, in order. Optionally ``identity()`` returns every setting that
    changes the answers, for the verdict cache key.
    """

    name: str
    model: str
    stats: JudgeStats

    # unannotated on purpose: config parsers match protocol methods by their annotations, and a user's judge
    # must not have to copy ours to be accepted
    async def judge(self, requests):
        """One verdict per request, in order."""


def check_judge(judge, option: str = "judge") -> None:
    """Raises a one-line ``TypeError`` naming what ``judge`` lacks to be a :class:`JudgeBackend`."""
    import inspect

    missing = [m for m in ("name", "model", "stats") if not hasattr(judge, m)]
    if not inspect.iscoroutinefunction(getattr(judge, "judge", None)):
        missing.append("async judge(requests)")
    if missing:
        raise TypeError(f"{option}: {type(judge).__name__} is not a judge backend: it lacks {', '.join(missing)}")


@dataclass
class JudgeStats:
    """What a judge backend did, counted the way a provider bills it.

    Attributes:
        verdicts: Verdicts produced by calls (successes and failures; cached verdicts are not calls).
        requests: Requests sent, retries and re-asks included.
        billed: Requests answered with a completion (the ones a provider charges for).
        cached: Verdicts served from a cache (free).
        retries: Transport retries (429, 5xx, timeouts, dropped connections).
        failures: Failed verdicts by reason.
    """

    verdicts: int = 0
    requests: int = 0
    billed: int = 0
    cached: int = 0
    retries: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def record(self, verdict: Verdict) -> None:
        if verdict.cached:
            self.cached += 1
            return
        self.verdicts += 1
        self.requests += verdict.requests
        self.billed += verdict.billed
        self.latencies.append(verdict.latency_s)
        self.input_tokens += verdict.input_tokens
        self.output_tokens += verdict.output_tokens
        self.cost_usd += verdict.cost_usd
        if verdict.failure:
            self.failures[verdict.failure] += 1

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def summary(self) -> dict:
        lat = sorted(self.latencies)

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0

        return {
            "verdicts": self.verdicts,
            "requests": self.requests,
            "billed": self.billed,
            "cached": self.cached,
            "retries": self.retries,
            "failed": self.failed,
            "failures": dict(self.failures),
            "latency_p50_s": statistics.median(lat) if lat else 0.0,
            "latency_p95_s": pct(0.95),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": round(self.cost_usd, 6),
        }
