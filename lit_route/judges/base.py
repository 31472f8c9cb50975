"""The judge protocol and the statistics every backend keeps."""

from __future__ import annotations

import collections
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from lit_route.types import JudgeRequest, Verdict


@runtime_checkable
class JudgeBackend(Protocol):
    """An LLM judge: async and batched. Failures come back as verdicts with ``preference=None``."""

    name: str
    model: str
    stats: JudgeStats

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        """One verdict per request, in order."""


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
