"""What one batch's routing produced: who answers each pair (:class:`Assignment`), the requests of one process's
share (:class:`JudgePlan`) and what merging the verdicts did (:class:`Merged`)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from lit_route.routing.allowance import Hold


@dataclass
class Assignment:
    """Who answers each pair of one (global) batch.

    Attributes:
        assign: (…) long, the shape of ``u``: −1 the PM, 0 the main judge, s ≥ 1 cascade stage s.
        routed: (…) bool, chosen by the router (main judge).
        audit: (…) bool, drawn for the audit (main judge, whatever the router chose).
        control: The controller's τ and target for this batch (empty without a controller).
        hold: What the batch may cost (calls, re-asks, estimated spend), held against the caps while in flight.
    """

    assign: torch.Tensor
    routed: torch.Tensor
    audit: torch.Tensor
    control: dict = field(default_factory=dict)
    hold: Hold = field(default_factory=Hold)

    def rows(self, rows: slice) -> Assignment:
        """The part of a (B_global, P) assignment this process holds (rows ``rows``)."""
        return Assignment(self.assign[rows], self.routed[rows], self.audit[rows], self.control, self.hold)


@dataclass
class JudgePlan:
    """The requests of one process's share of a batch.

    Attributes:
        keys: ``(b, i, j)`` per judged pair, in the order of ``items`` flattened over judges.
        kinds: ``(b, i, j)`` -> (routed, audited, judge index).
        items: Per judge (main first, then cascade stages) the ``(prompt, x, y)`` triples.
    """

    keys: list[tuple[int, int, int]]
    kinds: dict[tuple[int, int, int], tuple[bool, bool, int]]
    items: list[list[tuple[str, str, str]]]

    def within(self, calls: int, calls_per_pair: int) -> tuple[JudgePlan, int]:
        """The plan of as many of its first pairs (in ``keys`` order, main judge first) as ``calls`` pay for, and
        the calls left over for re-asks; the other pairs are left to the PM."""
        n_pairs = max(0, calls) // calls_per_pair
        keys, items, start = self.keys[:n_pairs], [], 0
        for judge_items in self.items:
            items.append(judge_items[:max(0, min(len(judge_items), n_pairs - start))])
            start += len(judge_items)
        return JudgePlan(keys, {k: self.kinds[k] for k in keys}, items), max(0, calls - len(keys) * calls_per_pair)


@dataclass
class Merged:
    """What :meth:`RoutingDecision.apply` did on this process's pairs.

    Attributes:
        totals: (n,) float64 sums to add over ranks before :meth:`RoutingDecision.close`.
        decisive: ``(b, i, j, score)`` of the main judge's verdicts (for exporting labels).
        latencies: Seconds of each pair's paid judge calls (cached verdicts left out).
        error: The exception the judge raised, if any.
        audited: ``(ū, agreement)`` of each audited pair the main judge decided (agreement of ``1[d > 0]`` with
            the verdict: 1, 0.5 for a tie, 0), for a controller that learns from the audit.
    """

    totals: torch.Tensor
    decisive: list[tuple[int, int, int, float]]
    latencies: list[float]
    error: BaseException | None = None
    audited: list[tuple[float, float]] = field(default_factory=list)


def prompt_text(messages) -> str:
    """Chat messages (or text) as the judge reads the prompt."""
    if isinstance(messages, str):
        return messages
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


class PendingJudge(NamedTuple):
    """A batch's judge calls in flight (``routed``: the local pairs asked, in the plan's order)."""

    future: Future | None
    routed: list
    started: float
    plan: JudgePlan
    key: int
    seed: int
    reserved: Hold
    control: dict


def latency_metrics(latencies: list[float]) -> dict[str, float]:
    """``judge/latency_p50``, ``_p95``, ``_max`` over the paid calls of a batch's pairs (this rank's)."""
    if not latencies:
        return {}
    t = torch.tensor(latencies, dtype=torch.float64)
    return {"judge/latency_p50": float(t.quantile(0.5)), "judge/latency_p95": float(t.quantile(0.95)),
            "judge/latency_max": float(t.max()), "judge/max_latency_s": float(t.max())}
