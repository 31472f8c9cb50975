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

import torch

from lit_route.checks import check_choice, check_fraction
from lit_route.judges.base import JudgeBackend, check_judge
from lit_route.judges.limits import REASK_ALLOWANCE, CallAllowance
from lit_route.judges.loop import submit as submit_on_loop
from lit_route.judges.pairwise import ORDERS, PairJudgement, judge_pairs
from lit_route.rewards.pairwise import upper_pairs, verdict_logits
from lit_route.routing.allowance import Allowance, Hold, PriceBook, reask_limit
from lit_route.routing.audit import AuditTally
from lit_route.routing.budget import BudgetLedger
from lit_route.routing.controller import BudgetTarget, Controller, target_fraction
from lit_route.routing.health import LASTING_FAILURES
from lit_route.routing.plan import Assignment, JudgePlan, Merged, prompt_text
from lit_route.routing.routers import count_for_fraction
from lit_route.uncertainty.delegation import delegation_signals, routing_model

__all__ = ["ROUTERS", "Assignment", "JudgePlan", "Merged", "RoutingDecision", "prompt_text"]

ROUTERS = ("uncertainty", "random", "margin", "learned")


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
        # what the batches in flight (routed, not yet charged) hold against the caps: calls, re-asks and spend
        self.reserved, self.reserved_usd, self.in_flight = 0, 0.0, 0
        self.prices = PriceBook(len(self.judges))
        self.reask_limits = [reask_limit(j) for j in self.judges]

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

    def allowance(self) -> Allowance:
        """What the caps leave for the next batch: the per-step cap, and the run's caps on calls and spend less
        what is charged and what the batches in flight hold."""
        ledger = self.ledger
        calls: float = math.inf
        if ledger.max_calls_per_step is not None:
            calls = ledger.max_calls_per_step
        if ledger.max_calls_total is not None:
            calls = min(calls, max(ledger.max_calls_total - ledger.calls - self.reserved, 0))
        usd = math.inf
        if ledger.max_spend_usd is not None:
            usd = max(ledger.max_spend_usd - ledger.spend_usd - self.reserved_usd, 0.0)
        return Allowance(calls, usd, [self.prices.estimate(j) for j in range(len(self.judges))],
                         self.calls_per_pair, busy=self.in_flight > 0)

    def route(self, d: torch.Tensor, u: torch.Tensor, key: int, step: int | None = None,
              step_seconds: float = 0.0) -> Assignment:
        """Decides one batch: ``d``, ``u`` (…) of all its pairs -> :class:`Assignment` of the same shape.

        ``key`` numbers the batch (the random draws depend on it and on ``seed``); ``step`` is the optimiser step
        a spend target paces over (default ``key``); ``step_seconds`` the last step's wall time (rate target).

        The audit sample is drawn first, uniformly and independently of the router, and paid first. The routed
        pairs are then the top k' of the router's order, with k' the router's count cut to what the caps leave
        after the audit: k' depends on how many pairs the audit drew, never on which, so the audited pairs among
        those left to the PM stay a uniform sample of them (the audit's estimates stay unbiased when a cap
        binds). Audited pairs among the top k' cost nothing more; the cascade's bands take what is left, by the
        same order. The batch's :class:`~lit_route.routing.allowance.Hold` (calls, the re-asks the judges' policies
        allow, estimated spend) is what :meth:`reserve` holds against the caps while its calls are in flight.
        """
        n = u.numel()
        d_flat, u_flat = d.flatten(), u.flatten()
        allow = self.allowance()
        cpp = self.calls_per_pair
        audit = torch.zeros(n, dtype=torch.bool)
        if self.audit_fraction > 0:
            draw = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7_919 + key + 1))
            audit[draw[: min(count_for_fraction(n, self.audit_fraction), allow.pairs(0))]] = True
        allow.take(0, int(audit.sum()) * cpp)
        k, control = self.how_many(u_flat, key if step is None else step, step_seconds)
        order = torch.argsort(self.priority(d_flat, u_flat, key), descending=True, stable=True)
        routed = torch.zeros(n, dtype=torch.bool)
        routed[order[: min(k, allow.pairs(0))]] = True
        assign = torch.full((n,), -1, dtype=torch.long)
        assign[routed | audit] = 0
        allow.take(0, int((routed & ~audit).sum()) * cpp)
        for stage, fraction in enumerate(self.stage_fractions, start=1):
            free = order[assign[order] == -1]
            take = free[: max(min(count_for_fraction(n, fraction), allow.pairs(stage)), 0)]
            assign[take] = stage
            allow.take(stage, take.numel() * cpp)
        hold = Hold()
        for j in range(len(self.judges)):
            calls = int((assign == j).sum()) * cpp
            hold.calls += calls
            hold.usd += calls * (self.prices.estimate(j) or 0.0)
            reasks = allow.reasks(j, calls, self.reask_limits[j])
            hold.reasks += reasks
            hold.usd += allow.take(j, reasks)
        self.pairs_seen += n
        return Assignment(assign.view(u.shape), routed.view(u.shape), audit.view(u.shape), control, hold)

    def reserve(self, assignment: Assignment | Hold) -> Hold:
        """Holds what a batch may cost against the caps until its calls are charged; returns the hold."""
        hold = assignment.hold if isinstance(assignment, Assignment) else assignment
        self.reserved += hold.total_calls
        self.reserved_usd += hold.usd
        self.in_flight += 1
        return hold

    def release(self, hold: Hold) -> None:
        """Frees a batch's hold once the batch is charged (or dropped)."""
        self.reserved = max(self.reserved - hold.total_calls, 0)
        self.reserved_usd = max(self.reserved_usd - hold.usd, 0.0)
        self.in_flight = max(self.in_flight - 1, 0)

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
                  spare_calls: int | CallAllowance | None = None) -> list[list[PairJudgement]]:
        """Every judge's items at once; one list of judgements per judge (``judges``: stand-ins for them).
        Re-asks of unusable answers draw on ``spare_calls`` (this process's part of the batch's held re-asks; a
        :class:`~lit_route.judges.limits.CallAllowance` to share one among several plans of a batch)."""
        if spare_calls is not None:  # set in this task's context: the judges' tasks below inherit it
            REASK_ALLOWANCE.set(spare_calls if isinstance(spare_calls, CallAllowance) else CallAllowance(spare_calls))

        async def run(judge, items):
            return await judge_pairs(judge, items, self.order, seed) if items else []

        use = list(judges) if judges is not None else self.judges
        return list(await asyncio.gather(*(run(j, items) for j, items in zip(use, plan.items, strict=True))))

    def submit(self, plan: JudgePlan, seed: int, judges: Sequence | None = None,
               spare_calls: int | CallAllowance | None = None) -> Future | None:
        """:meth:`ask` on the process's judge loop; ``None`` when there is nothing to ask."""
        return submit_on_loop(self.ask(plan, seed, judges, spare_calls)) if plan.keys else None

    # --- merge -------------------------------------------------------------------------------------------------
    def apply(self, plan: JudgePlan, result: list[list[PairJudgement]] | BaseException, scores: torch.Tensor,
              pm_scores: torch.Tensor, judged: torch.Tensor, paid: Sequence[tuple[int, float]] | None = None,
              uncertainty: torch.Tensor | None = None) -> Merged:
        """Verdicts into ``scores`` (B, K, K) (``S_ij = ±c`` or 0, ``S_ji = −S_ij``) and ``judged``; a failed pair or a
        judge that raised (``result`` is the exception) leaves the PM's score and is counted. ``paid``: billed calls
        and spend per judge from a :class:`~lit_route.routing.journal.PaidJournal`, charged instead of the
        verdicts' own (it also holds what a killed process paid for the batch). ``uncertainty`` (B, K, K): ū, for
        :attr:`Merged.audited`. The batch's pairs (``pm_scores``, and which of them were routed) also go to the
        audit's pool of pairs left to the PM, and each judge's billed calls to the price book."""
        error = result if isinstance(result, BaseException) else None
        judgements = [] if error is not None else [jd for per_judge in result for jd in per_judge]
        failures = billed = requests = cached = lasting = 0
        spend = tokens = 0.0
        stage_counts = [0] * len(self.judges)
        judge_billed, judge_spend = [0] * len(self.judges), [0.0] * len(self.judges)
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
            judge_billed[plan.kinds[bi, i, j][2]] += jd.billed
            judge_spend[plan.kinds[bi, i, j][2]] += jd.cost_usd
            call_seconds = [v.latency_s for v in jd.verdicts if not v.cached]
            paid_now = [v for v in jd.verdicts if v.billed and not v.cached]
            self.prices.observe(plan.kinds[bi, i, j][2], sum(v.cost_usd for v in paid_now),
                                sum(v.billed for v in paid_now))
            if call_seconds:
                latencies.append(sum(call_seconds))
            self.inconsistent += int(jd.inconsistent)
            if jd.score is None:
                failures += 1
                lasting += jd.failure in LASTING_FAILURES
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
            paid = list(paid) + [(0, 0.0)] * (len(self.judges) - len(paid))
            judge_billed, judge_spend = [int(b) for b, _ in paid], [float(c) for _, c in paid]
            billed, spend = sum(judge_billed), sum(judge_spend)
        self._observe_pool(plan, pm_scores)
        totals = torch.tensor([len(plan.keys), failures, billed, requests, cached, spend, tokens, error is not None,
                               lasting, *stage_counts, *judge_billed, *judge_spend, *self.audit.step_counts()],
                              dtype=torch.float64)
        return Merged(totals, decisive, latencies, error, audited_pairs)

    def _observe_pool(self, plan: JudgePlan, pm_scores: torch.Tensor) -> None:
        """Every pair of this process's rows, and whether the router chose it, into the audit's pool."""
        if pm_scores.dim() != 3 or pm_scores.shape[-1] < 2:
            return
        ii, jj = upper_pairs(pm_scores.shape[-1])
        index = {(i, j): p for p, (i, j) in enumerate(zip(ii.tolist(), jj.tolist(), strict=True))}
        routed = torch.zeros(pm_scores.shape[0], len(index), dtype=torch.bool)
        for (bi, i, j), (was_routed, _, _) in plan.kinds.items():
            routed[bi, index[i, j]] = was_routed
        self.audit.observe_pool(pm_scores[:, ii, jj], routed)

    def observe_audit(self, audited: Sequence[tuple[float, float]]) -> None:
        """Hands the batch's audited ``(ū, agreement)`` pairs (every rank's) to a controller that learns from them
        (:class:`~lit_route.routing.risk.RiskController`)."""
        observe = getattr(self.controller, "observe", None)
        if observe is not None and audited:
            u, agree = zip(*audited, strict=True)
            observe(torch.tensor(u, dtype=torch.float64), torch.tensor(agree, dtype=torch.float64))

    def close(self, totals: torch.Tensor, audited: Sequence[tuple[float, float]] = ()) -> dict[str, float]:
        """Charges a batch's totals (summed over ranks), hands its audited ``(ū, agreement)`` pairs (every rank's)
        to a controller that learns from them, and returns its ``judge/*``, ``audit/*``, ``cascade/*`` metrics;
        ``judge/errors`` is 1 when a judge raised on some rank; ``judge/lasting_failures`` counts the pairs that
        failed for a reason no retry mends (:data:`~lit_route.routing.health.LASTING_FAILURES`)."""
        self.observe_audit(audited)
        n_routed, n_failed, n_billed, n_requests, n_cached, n_spend, n_tokens, n_errors, n_lasting, *rest = (
            totals.tolist())
        n = len(self.judges)
        stage_counts, judge_billed, judge_spend, audit = rest[:n], rest[n : 2 * n], rest[2 * n : 3 * n], rest[3 * n :]
        self.audit.close_step(audit)
        self.pairs_routed += int(n_routed)
        self.ledger.charge(int(n_billed), n_spend, int(n_failed), int(n_cached),
                           by_judge=[(int(b), c) for b, c in zip(judge_billed, judge_spend, strict=True)])
        return {
            "judge/routed_pairs": n_routed, "judge/failures": n_failed, "judge/billed": n_billed,
            "judge/requests": n_requests, "judge/cached": n_cached, "judge/tokens": n_tokens,
            "judge/cost_usd": n_spend, "judge/errors": float(n_errors > 0), "judge/lasting_failures": n_lasting,
            "judge/total_billed": float(self.ledger.calls), "judge/total_spend_usd": self.ledger.spend_usd,
            **self.audit.metrics(),
            **({f"cascade/judged_by_{s}": c for s, c in enumerate(stage_counts)} if self.stages else {}),
        }

    def merge(self, plan: JudgePlan, result, scores, pm_scores, judged, uncertainty=None) -> dict[str, float]:
        """:meth:`apply` then :meth:`close`, for a single process."""
        merged = self.apply(plan, result, scores, pm_scores, judged, uncertainty=uncertainty)
        return self.close(merged.totals, merged.audited)

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
            "prices": self.prices.state_dict(),
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
        self.prices.load_state_dict(state.get("prices"))
