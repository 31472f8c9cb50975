"""``RoutingDecision``: which pairs of a batch go to which judge, the judge calls, and the merge of their verdicts.

A plain object (no Lightning): the routing callback, the Fabric loop, a reward function of another trainer or an
HTTP reward server all call it. One batch goes through four calls:

1. :meth:`RoutingDecision.route` — ``d``, ``ū`` of the batch's pairs (the *global* batch under DDP: every rank
   passes the same tensors and gets the same :class:`Assignment`) -> which judge answers each pair;
2. :meth:`RoutingDecision.plan` — the judge's requests for the pairs this process holds;
3. :meth:`RoutingDecision.submit` (or ``await`` :meth:`RoutingDecision.ask`) — the calls, on the judge loop;
4. :meth:`RoutingDecision.apply` — verdicts into ``S`` (this process's pairs), then :meth:`RoutingDecision.close`
   with the step's totals (summed over ranks by the caller under DDP) — ledger, audit tally, counters.
   :meth:`RoutingDecision.merge` does both for a single process.

Randomness (the random router, the audit draw) is keyed by ``key``, a count of sampled batches, not by the
optimiser step: with gradient accumulation or a reward pipeline several batches share a step.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from lit_route.checks import check_choice, check_fraction
from lit_route.judges.base import JudgeBackend, check_judge
from lit_route.judges.limits import REASK_ALLOWANCE, CallAllowance
from lit_route.judges.loop import submit as submit_on_loop
from lit_route.judges.pairwise import ORDERS, PairJudgement, judge_pairs
from lit_route.rewards.pairwise import verdict_logits
from lit_route.routing.audit import AuditTally
from lit_route.routing.budget import BudgetLedger
from lit_route.routing.controller import BudgetTarget, Controller, target_fraction
from lit_route.routing.routers import count_for_fraction
from lit_route.uncertainty.delegation import delegation_signals, routing_model

ROUTERS = ("uncertainty", "random", "margin", "learned")


@dataclass
class Assignment:
    """Who answers each pair of one (global) batch.

    Attributes:
        assign: (…) long, the shape of ``u``: −1 the PM, 0 the main judge, s ≥ 1 cascade stage s.
        routed: (…) bool, chosen by the router (main judge).
        audit: (…) bool, drawn for the audit (main judge, whatever the router chose).
        control: The controller's τ and target for this batch (empty without a controller).
    """

    assign: torch.Tensor
    routed: torch.Tensor
    audit: torch.Tensor
    control: dict = field(default_factory=dict)

    def rows(self, rows: slice) -> Assignment:
        """The part of a (B_global, P) assignment this process holds (rows ``rows``)."""
        return Assignment(self.assign[rows], self.routed[rows], self.audit[rows], self.control)


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


class RoutingDecision:
    """The routing policy and its state (ledger, controller, audit tally, counters); see the module docstring.

    Args:
        judge: The main judge.
        router: ``uncertainty`` (highest ū), ``random`` (as many pairs at random), ``margin`` (smallest |d|) or
            ``learned`` (highest fitted P(PM wrong) of the ``delegation`` model).
        fraction: Share of each batch's pairs to judge; ignored with ``threshold`` or ``controller``.
        threshold: Judge every pair with ū > τ instead.
        ledger: Caps on billed calls and spend, and what was spent.
        verdict_logit: c: the logit a verdict is worth.
        order: Display order: ``random``, ``both`` (two calls per pair) or ``fixed``.
        seed: Seed of the display order, the random router and the audit draw.
        controller: Moves τ between batches towards ``target``.
        target: What the controller aims for (default: ``fraction``).
        audit_fraction: Share of each batch's pairs drawn uniformly for the main judge, whatever the router chose.
        stages: Cascade: ``(judge, fraction)`` for the bands below the routed pairs, in order.
        delegation: The ``learned`` router's model file (:mod:`lit_route.uncertainty.delegation`; PM signals only).
    """

    def __init__(self, judge: JudgeBackend, router: str = "uncertainty", fraction: float = 0.25,
                 threshold: float | None = None, ledger: BudgetLedger | None = None, verdict_logit: float = 2.0,
                 order: str = "random", seed: int = 0, controller: Controller | None = None,
                 target: BudgetTarget | None = None, audit_fraction: float = 0.0,
                 stages: Sequence[tuple[JudgeBackend, float]] = (), delegation: str | None = None):
        check_judge(judge)
        check_choice("router", router, ROUTERS)
        check_choice("order", order, ORDERS)
        check_fraction("fraction", fraction)
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"threshold: expected a finite number, got {threshold}")
        if (threshold is not None or controller is not None) and router in ("margin", "learned"):
            raise ValueError(f"threshold: applies to the uncertainty and random routers; the {router} router takes "
                             "fraction")
        self.delegation = routing_model(router, delegation)
        if threshold is not None and controller is not None:
            raise ValueError("controller: moves the threshold itself; give a controller or a threshold, not both")
        check_fraction("audit_fraction", audit_fraction)
        for i, (stage_judge, stage_fraction) in enumerate(stages):
            check_judge(stage_judge, f"cascade[{i}].judge")
            check_fraction(f"cascade[{i}].fraction", stage_fraction)
        if not math.isfinite(verdict_logit) or verdict_logit <= 0:
            raise ValueError(f"verdict_logit: expected a finite number > 0, got {verdict_logit}")
        self.judge = judge
        self.stages = [j for j, _ in stages]
        self.stage_fractions = [f for _, f in stages]
        self.router, self.fraction, self.threshold = router, fraction, threshold
        self.ledger = ledger or BudgetLedger()
        self.c, self.order, self.seed = verdict_logit, order, seed
        self.controller = controller
        self.target = target or BudgetTarget(kind="fraction", fraction=fraction)
        self.audit_fraction = audit_fraction
        self.audit = AuditTally()
        self.pairs_seen = 0
        self.pairs_routed = 0
        self.inconsistent = 0
        self.failures: collections.Counter = collections.Counter()
        self.reserved = 0  # calls routed but not yet charged (pipelined batches in flight)
        self.spare_calls = 0  # what the caps leave beyond the last batch's planned calls (re-asks draw on it)

    @property
    def calls_per_pair(self) -> int:
        return 2 if self.order == "both" else 1

    @property
    def judges(self) -> list:
        return [self.judge, *self.stages]

    # --- decision ---------------------------------------------------------------------------------------------
    def priority(self, d: torch.Tensor, u: torch.Tensor, key: int) -> torch.Tensor:
        """Higher first: ū (uncertainty), −|d| (margin), or a uniform draw keyed by ``key`` (random)."""
        if self.router == "uncertainty":
            return u.double()
        if self.router == "margin":
            return -d.abs().double()
        if self.router == "learned":
            return self.delegation.logits(delegation_signals(d, u))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        return torch.rand(u.shape, generator=generator, dtype=torch.float64)

    def how_many(self, u: torch.Tensor, step: int, step_seconds: float = 0.0) -> tuple[int, dict]:
        """Pairs the router asks for (before the caps) and the controller's numbers (``step``: optimiser steps
        done, for a spend target paced over steps; ``step_seconds``: for a rate target)."""
        if self.controller is not None:
            usd_per_call = self.ledger.spend_usd / self.ledger.calls if self.ledger.calls else 0.0
            target = target_fraction(self.target, u.numel(), self.calls_per_pair, step, step_seconds,
                                     self.ledger.spend_usd, usd_per_call)
            if self.controller.tau is None:
                self.controller.calibrate(u, target)
            tau = self.controller.threshold(u)
            k = int((u > tau).sum())
            self.controller.update(u, target)  # τ for the next batch, from what this one would route
            return k, {"judge/tau": tau, "judge/target_fraction": target}
        if self.threshold is not None:
            return int((u > self.threshold).sum()), {}
        return count_for_fraction(u.numel(), self.fraction), {}

    def allowance(self) -> int:
        """Pairs the caps still allow now (calls in flight for pending batches count against the run's cap)."""
        calls = self.ledger.allowance()
        if self.ledger.max_calls_total is not None:
            calls = min(calls, max(self.ledger.max_calls_total - self.ledger.calls - self.reserved, 0))
        return calls // self.calls_per_pair

    def route(self, d: torch.Tensor, u: torch.Tensor, key: int, step: int | None = None,
              step_seconds: float = 0.0) -> Assignment:
        """Decides one batch: ``d``, ``u`` (…) of all its pairs -> :class:`Assignment` of the same shape.

        ``key`` numbers the batch (the random draws depend on it and on ``seed``); ``step`` is the optimiser step
        a spend target paces over (default ``key``); ``step_seconds`` the last step's wall time (rate target).

        The audit sample is drawn first, uniformly and independently of the router, and charged first: when a
        cap binds, routed pairs give way, so the audit stays a uniform sample and its agreement unbiased. The
        routed pairs are then the longest run of the router's order that the caps still pay for (audited pairs
        among them cost nothing more), and the cascade's bands take what is left, by the same order.
        """
        n = u.numel()
        d_flat, u_flat = d.flatten(), u.flatten()
        allowance = self.allowance()
        audit = torch.zeros(n, dtype=torch.bool)
        if self.audit_fraction > 0:
            draw = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7_919 + key + 1))
            audit[draw[: min(count_for_fraction(n, self.audit_fraction), allowance)]] = True
        left = allowance - int(audit.sum())
        k, control = self.how_many(u_flat, key if step is None else step, step_seconds)
        order = torch.argsort(self.priority(d_flat, u_flat, key), descending=True, stable=True)
        candidates = order[:k]
        fits = torch.cumsum((~audit[candidates]).long(), 0) <= left  # a prefix: the sum only grows
        routed = torch.zeros(n, dtype=torch.bool)
        routed[candidates[fits]] = True
        assign = torch.full((n,), -1, dtype=torch.long)
        assign[routed | audit] = 0
        left -= int((routed & ~audit).sum())
        for stage, fraction in enumerate(self.stage_fractions, start=1):
            free = order[assign[order] == -1]
            take = free[: max(min(count_for_fraction(n, fraction), left), 0)]
            assign[take] = stage
            left -= take.numel()
        self.spare_calls = max(allowance - int((assign >= 0).sum()), 0) * self.calls_per_pair
        self.pairs_seen += n
        return Assignment(assign.view(u.shape), routed.view(u.shape), audit.view(u.shape), control)

    def reserve(self, assignment: Assignment) -> int:
        """Holds the calls of a batch whose verdicts are pending against the run's cap; returns the amount."""
        calls = int((assignment.assign >= 0).sum()) * self.calls_per_pair
        self.reserved += calls
        return calls

    def release(self, calls: int) -> None:
        """Frees a reservation once the batch is charged."""
        self.reserved = max(self.reserved - calls, 0)

    # --- judging ----------------------------------------------------------------------------------------------
    def plan(self, local: Assignment, pairs: Sequence[tuple[int, int]], prompts: Sequence,
             completions: Sequence[Sequence[str]]) -> JudgePlan:
        """The requests for this process's rows: ``local`` (B, P) over the upper-triangle ``pairs`` (i, j)."""
        kinds: dict[tuple[int, int, int], tuple[bool, bool, int]] = {}
        for bi, p in (local.assign >= 0).nonzero().tolist():
            i, j = pairs[p]
            kinds[bi, i, j] = (bool(local.routed[bi, p]), bool(local.audit[bi, p]), int(local.assign[bi, p]))
        per_judge: list[list[tuple[int, int, int]]] = [[] for _ in self.judges]
        for pair_key, (_, _, judge) in kinds.items():
            per_judge[judge].append(pair_key)
        items = [[(prompt_text(prompts[bi]), completions[bi][i], completions[bi][j]) for bi, i, j in keys]
                 for keys in per_judge]
        return JudgePlan([k for keys in per_judge for k in keys], kinds, items)

    async def ask(self, plan: JudgePlan, seed: int, judges: Sequence | None = None,
                  spare_calls: int | None = None) -> list[list[PairJudgement]]:
        """Every judge's items at once; one list of judgements per judge (``judges``: stand-ins for them).
        Re-asks of unusable answers share ``spare_calls`` (this process's part of what the caps leave)."""
        if spare_calls is not None:  # set in this task's context: the judges' tasks below inherit it
            REASK_ALLOWANCE.set(CallAllowance(spare_calls))

        async def run(judge, items):
            return await judge_pairs(judge, items, self.order, seed) if items else []

        use = list(judges) if judges is not None else self.judges
        return list(await asyncio.gather(*(run(j, items) for j, items in zip(use, plan.items, strict=True))))

    def submit(self, plan: JudgePlan, seed: int, judges: Sequence | None = None,
               spare_calls: int | None = None) -> Future | None:
        """:meth:`ask` on the process's judge loop; ``None`` when there is nothing to ask."""
        return submit_on_loop(self.ask(plan, seed, judges, spare_calls)) if plan.keys else None

    # --- merge -------------------------------------------------------------------------------------------------
    def apply(self, plan: JudgePlan, result: list[list[PairJudgement]] | BaseException, scores: torch.Tensor,
              pm_scores: torch.Tensor, judged: torch.Tensor, paid: tuple[int, float] | None = None,
              uncertainty: torch.Tensor | None = None) -> Merged:
        """Verdicts into ``scores`` (B, K, K) (``S_ij = ±c`` or 0, ``S_ji = −S_ij``) and ``judged``; a failed pair or a
        judge that raised (``result`` is the exception) leaves the PM's score and is counted. ``paid``: billed calls
        and spend from a :class:`~lit_route.routing.journal.PaidJournal`, charged instead of the verdicts' own
        (it also holds what a killed process paid for the batch). ``uncertainty`` (B, K, K): ū, for
        :attr:`Merged.audited`."""
        error = result if isinstance(result, BaseException) else None
        judgements = [] if error is not None else [jd for per_judge in result for jd in per_judge]
        failures = billed = requests = cached = 0
        spend = tokens = 0.0
        stage_counts = [0] * len(self.judges)
        decisive, latencies, audited_pairs = [], [], []
        if error is not None:
            failures = len(plan.keys)
            self.failures[f"error:{type(error).__name__}"] += len(plan.keys)
        for (bi, i, j), jd in zip(plan.keys, judgements, strict=error is None):
            billed += jd.billed
            requests += jd.requests
            cached += jd.cached
            spend += jd.cost_usd
            tokens += jd.tokens
            call_seconds = [v.latency_s for v in jd.verdicts if not v.cached]
            if call_seconds:
                latencies.append(sum(call_seconds))
            self.inconsistent += int(jd.inconsistent)
            if jd.score is None:
                failures += 1
                self.failures[jd.failure or "failed"] += 1
                continue
            routed, audited, stage = plan.kinds[bi, i, j]
            if stage == 0:
                self.audit.add(routed, audited, pm_score=float(pm_scores[bi, i, j]), judge_score=jd.score)
                if audited and uncertainty is not None:
                    pm_prefers = float(pm_scores[bi, i, j] > 0)
                    audited_pairs.append((float(uncertainty[bi, i, j]), 1.0 - abs(pm_prefers - jd.score)))
                decisive.append((bi, i, j, jd.score))
            stage_counts[stage] += 1
            value = float(verdict_logits(torch.tensor(jd.score), self.c))
            scores[bi, i, j] = value
            scores[bi, j, i] = -value
            judged[bi, i, j] = judged[bi, j, i] = True
        if paid is not None:
            billed, spend = paid
        totals = torch.tensor([len(plan.keys), failures, billed, requests, cached, spend, tokens, error is not None,
                               *stage_counts, *self.audit.step_counts()], dtype=torch.float64)
        return Merged(totals, decisive, latencies, error, audited_pairs)

    def observe_audit(self, audited: Sequence[tuple[float, float]]) -> None:
        """Hands the batch's audited ``(ū, agreement)`` pairs (every rank's) to a controller that learns from them
        (:class:`~lit_route.routing.risk.RiskController`)."""
        observe = getattr(self.controller, "observe", None)
        if observe is not None and audited:
            u, agree = zip(*audited, strict=True)
            observe(torch.tensor(u, dtype=torch.float64), torch.tensor(agree, dtype=torch.float64))

    def close(self, totals: torch.Tensor) -> dict[str, float]:
        """Charges a batch's totals (summed over ranks) and returns its ``judge/*``, ``audit/*``, ``cascade/*``
        metrics; ``judge/errors`` is 1 when a judge raised on some rank."""
        n_routed, n_failed, n_billed, n_requests, n_cached, n_spend, n_tokens, n_errors, *rest = totals.tolist()
        stage_counts, audit = rest[: len(self.judges)], rest[len(self.judges) :]
        self.audit.close_step(audit)
        self.pairs_routed += int(n_routed)
        self.ledger.charge(int(n_billed), n_spend, int(n_failed), int(n_cached))
        return {
            "judge/routed_pairs": n_routed, "judge/failures": n_failed, "judge/billed": n_billed,
            "judge/requests": n_requests, "judge/cached": n_cached, "judge/tokens": n_tokens,
            "judge/cost_usd": n_spend, "judge/errors": float(n_errors > 0),
            "judge/total_billed": float(self.ledger.calls), "judge/total_spend_usd": self.ledger.spend_usd,
            **self.audit.metrics(),
            **({f"cascade/judged_by_{s}": c for s, c in enumerate(stage_counts)} if self.stages else {}),
        }

    def merge(self, plan: JudgePlan, result, scores, pm_scores, judged) -> dict[str, float]:
        """:meth:`apply` then :meth:`close`, for a single process."""
        return self.close(self.apply(plan, result, scores, pm_scores, judged).totals)

    # --- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "ledger": self.ledger.state_dict(),
            "pairs_seen": self.pairs_seen,
            "pairs_routed": self.pairs_routed,
            "inconsistent": self.inconsistent,
            "failures": dict(self.failures),
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "audit": self.audit.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.ledger.load_state_dict(state["ledger"])
        self.pairs_seen = int(state["pairs_seen"])
        self.pairs_routed = int(state["pairs_routed"])
        self.inconsistent = int(state["inconsistent"])
        self.failures = collections.Counter(state["failures"])
        if self.controller is not None and state.get("controller") is not None:
            self.controller.load_state_dict(state["controller"])
        if "audit" in state:
            self.audit.load_state_dict(state["audit"])
