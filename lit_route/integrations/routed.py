"""``RoutedRewards``: groups of completions in, routed pairwise rewards out; what the TRL reward function and the
reward server share.

Per batch of groups: the PM scores every pair (``S``, ``U``; :func:`~lit_route.policy.pm_scoring.score_groups`),
the routing decision (:class:`~lit_route.routing.decision.RoutingDecision`, the object the Lightning callback
uses) picks the pairs for the judge within the budget, the judge answers on the judge event loop, its verdicts
replace ``S_ij`` (a failed call leaves the PM's score), and ``r_i = (1/(K−1)) Σ_j S_ij``.

Thread-safe: the PM runs one batch at a time; routing and charging happen under one lock, with the calls of a
batch in flight reserved against the run's cap, so concurrent batches (many trainer workers on one server)
cannot overspend it; the judge calls of all batches run at once on the judge loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lit_route.checks import check_nonnegative
from lit_route.judges.limits import CallAllowance
from lit_route.policy.pm_scoring import score_groups
from lit_route.rewards.pairwise import pairwise_rewards, upper_pairs
from lit_route.routing.decision import Assignment
from lit_route.routing.health import JudgeHealth, failure_text

log = logging.getLogger(__name__)

@dataclass
class GroupScores:
    """Rewards of a batch of groups.

    Attributes:
        rewards: Per group, ``r_i = mean_j S_ij`` after routing (K values).
        pm_rewards: Per group, the same mean over the PM's own scores.
        judged: Per group and completion, how many of its pairs a judge decided.
        stats: The batch's numbers (``judge/*``, ``audit/*``, ``cascade/*``, ``reward/*``).
    """

    rewards: list[list[float]]
    pm_rewards: list[list[float]]
    judged: list[list[int]]
    stats: dict[str, float] = field(default_factory=dict)


class RoutedRewards:
    """A frozen PM and a routing decision, shared safely by any number of threads.

    Args:
        pm: The reward PM (a ``PreferenceModule`` in eval mode).
        encoder: Its :class:`~lit_route.data.encoding.PairEncoder`.
        decision: The routing decision (``None``: PM scores only, no judge).
        pm_batch_size: Unordered pairs per PM forward pass.
        max_consecutive_errors: Batches in a row in which the judge may raise, or fail every routed pair with a
            client error (a rejected key) or a connection failure, before :meth:`score` raises
            :class:`~lit_route.routing.health.JudgeFailing` (``None``: never; the PM scores stand either way). :meth:`judge_health` says
            how many batches in a row failed so, and why.
    """

    def __init__(self, pm, encoder, decision=None, pm_batch_size: int = 16, max_consecutive_errors: int | None = None):
        check_nonnegative("pm_batch_size", pm_batch_size, integer=True, positive=True)
        if max_consecutive_errors is not None:
            check_nonnegative("max_consecutive_errors", max_consecutive_errors, integer=True)
        self.pm, self.encoder, self.decision = pm, encoder, decision
        self.pm_batch_size = pm_batch_size
        self.max_consecutive_errors = max_consecutive_errors
        self._pm_lock = threading.Lock()
        self._lock = threading.Lock()
        self.batches = 0  # keys the decision's random draws: a count of scored batches
        self.groups = 0
        self.health = JudgeHealth(max_consecutive_errors)
        # pairs each judge answered (main first, then the cascade's stages), since start or the restored state
        self.judged_by = [0] * len(decision.judges) if decision is not None and decision.stages else []
        self._last_batch: float | None = None
        self.journal = None  # a PaidJournal: every billed call written down as it returns (see use_journal)
        self._in_flight: set[int] = set()  # batches routed, not yet charged
        self._owed: set[int] = set()  # batches in flight when the loaded state was saved

    @classmethod
    def build(cls, pm_ckpt: str | None = None, judge=None, *, pm_backbone=None, device: str = "cpu",
              pm_batch_size: int = 16, max_consecutive_errors: int | None = None, cache: str | None = None,
              max_calls_per_step: int | None = None, max_calls_total: int | None = None,
              max_spend_usd: float | None = None, cascade: Sequence = (), **routing) -> RoutedRewards:
        """From a PM checkpoint (or an untrained PM on ``pm_backbone``, for debugging) and a judge; ``routing``
        are :class:`~lit_route.routing.decision.RoutingDecision`'s settings, the caps go to its ledger, ``cache``
        (an sqlite file) and each cascade stage's ``cache`` put a verdict cache in front of their judge."""
        from lit_route.policy.pm_scoring import load_reward_pm

        decision = None  # first: a wrong setting is reported before the PM is loaded
        if judge is not None:
            decision = build_decision(judge, cache=cache, cascade=cascade, max_calls_per_step=max_calls_per_step,
                                      max_calls_total=max_calls_total, max_spend_usd=max_spend_usd, **routing)
        if pm_ckpt is not None:
            from lit_route.preference.io import load_preference_model

            pm, encoder = load_preference_model(pm_ckpt, device)
            pm.requires_grad_(False)
        else:
            pm, encoder = load_reward_pm(None, pm_backbone)
            pm.to(device)
        return cls(pm, encoder, decision, pm_batch_size, max_consecutive_errors)

    # --- scoring -----------------------------------------------------------------------------------------------
    def pm_scores(self, prompts: Sequence, completions: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """S (B, K, K) and U (B, K, K) of B groups of K completions, one PM batch at a time."""
        with self._pm_lock:
            return score_groups(self.pm, self.encoder, list(prompts), [list(c) for c in completions],
                                self.pm_batch_size)

    def score(self, prompts: Sequence, completions: Sequence[Sequence[str]], step: int | None = None) -> GroupScores:
        """Routed pairwise rewards of B groups (prompt ``prompts[b]``, completions ``completions[b]``; groups may
        differ in size, each at least 2). ``step``: the trainer's optimiser step, which a spend target paces
        over (default: the count of scored batches). One call is one batch for the routing decision (one
        ``max_calls_per_step``, one random draw), whatever the group sizes."""
        by_size: dict[int, list[int]] = {}
        for b, group in enumerate(completions):
            if len(group) < 2:
                raise ValueError(f"group {b}: {len(group)} completion(s); a pairwise reward needs at least 2")
            by_size.setdefault(len(group), []).append(b)
        parts = []
        for rows in by_size.values():  # one PM batch per group size
            p = [prompts[b] for b in rows]
            c = [list(completions[b]) for b in rows]
            s, u = self.pm_scores(p, c)
            parts.append(_Part(rows, p, c, s, u, s.clone(), torch.zeros_like(s, dtype=torch.bool)))
        stats: dict[str, float] = self._route(parts, step) if self.decision is not None else {}
        rewards: list = [None] * len(completions)
        pm_rewards: list = [None] * len(completions)
        judged_counts: list = [None] * len(completions)
        for part in parts:
            for row, b in enumerate(part.rows):
                rewards[b] = pairwise_rewards(part.s[row : row + 1])[0].tolist()
                pm_rewards[b] = pairwise_rewards(part.pm_s[row : row + 1])[0].tolist()
                judged_counts[b] = part.judged[row].sum(-1).tolist()
        n_pairs = sum(len(c) * (len(c) - 1) // 2 for c in completions)
        judged_pairs = sum(sum(j) for j in judged_counts) // 2
        stats["judge/fraction"] = judged_pairs / n_pairs
        with self._lock:
            self.groups += len(completions)
        return GroupScores(rewards, pm_rewards, judged_counts, stats)

    def _route(self, parts: list[_Part], step: int | None = None) -> dict[str, float]:
        """One batch (every part's pairs together) through the decision: route and hold its cost against the caps
        (locked), judge (unlocked, on the judge loop), merge and charge (locked). Each part's ``s`` and ``judged``
        are changed in place."""
        decision = self.decision
        pieces = [(part, *upper_pairs(part.s.shape[-1])) for part in parts]
        with self._lock:
            now = time.perf_counter()
            step_seconds = now - self._last_batch if self._last_batch is not None else 0.0
            self._last_batch = now
            key = self.batches
            self.batches += 1
            self._in_flight.add(key)
            d = torch.cat([part.s[:, ii, jj].float().flatten() for part, ii, jj in pieces])
            u = torch.cat([part.u[:, ii, jj].float().flatten() for part, ii, jj in pieces])
            assignment = decision.route(d, u, key, step=step, step_seconds=step_seconds)
            hold = decision.reserve(assignment)
        try:
            plans, offset = [], 0
            for part, ii, jj in pieces:  # the one decision, cut back into each part's (B, P) rows
                b, n = part.s.shape[0], ii.numel()
                cut = slice(offset, offset + b * n)
                offset += b * n
                local = Assignment(*(t[cut].view(b, n) for t in (assignment.assign, assignment.routed,
                                                                  assignment.audit)))
                plans.append(decision.plan(local, list(zip(ii.tolist(), jj.tolist(), strict=True)), part.prompts,
                                           part.completions))
            judges = ([self.journal.meter(j, key, index) for index, j in enumerate(decision.judges)]
                      if self.journal is not None else None)
            reasks = CallAllowance(hold.reasks)  # one allowance for the whole batch, shared by its parts
            futures = [decision.submit(plan, seed=decision.seed + key * 1009 + i, judges=judges, spare_calls=reasks)
                       for i, plan in enumerate(plans)]
            results = []
            for plan, future in zip(plans, futures, strict=True):
                try:
                    results.append(future.result() if future is not None else [[] for _ in decision.judges])
                except Exception as err:  # a judge that raises (local model error, locked cache): PM scores stand
                    log.warning("judge raised %s: %s; the %d routed pairs keep their PM scores", type(err).__name__,
                                err, len(plan.keys))
                    results.append(err)
            with self._lock:
                paid = self.journal.take(key) if self.journal is not None else None
                no_pay = None if paid is None else []  # the journal's record is the whole batch's
                merged = [decision.apply(plan, result, part.s, part.pm_s, part.judged, paid if i == 0 else no_pay,
                                         uncertainty=part.u)
                          for i, (plan, result, (part, _, _)) in enumerate(zip(plans, results, pieces, strict=True))]
                decision.release(hold)
                hold = None
                stats = decision.close(sum(m.totals for m in merged), [p for m in merged for p in m.audited])
                for stage in range(len(self.judged_by)):
                    self.judged_by[stage] += int(stats[f"cascade/judged_by_{stage}"])
                self._in_flight.discard(key)  # charged and no longer in flight in one step: a saved state has both
                error = next((r for r in results if isinstance(r, BaseException)), None)
                answers = [per_judge for r in results if not isinstance(r, BaseException) for per_judge in r]
                failing = self.health.record(int(stats["judge/routed_pairs"]), int(stats["judge/lasting_failures"]),
                                             error, failure_text(answers))
        finally:
            with self._lock:
                if hold is not None:  # the batch did not reach its charge (an error above)
                    decision.release(hold)
                self._in_flight.discard(key)
        stats.update(assignment.control)
        if failing is not None:
            raise failing
        return stats

    def judge_health(self) -> dict:
        """:meth:`~lit_route.routing.health.JudgeHealth.status`: ``ok``, ``degraded`` or ``failing`` (then
        :meth:`score` raises), with the reason."""
        with self._lock:
            return self.health.status()

    def score_samples(self, groups):
        """The server's entry: groups of :class:`~lit_route.integrations.openrlhf.Sample` -> per sample
        :class:`~lit_route.integrations.collector.Scored`."""
        from lit_route.integrations.collector import Scored

        out = self.score([g[0].context or g[0].prompt for g in groups], [[s.response for s in g] for g in groups])
        return [[Scored(r, p, j) for r, p, j in zip(rs, ps, js, strict=True)]
                for rs, ps, js in zip(out.rewards, out.pm_rewards, out.judged, strict=True)]

    # --- state and totals --------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Totals since start (or since the restored state): billed calls, spend, routed share, failures."""
        with self._lock:
            out: dict = {"scored_groups": self.groups, "batches": self.batches}
            d = self.decision
            if d is None:
                return {**out, "pairs_seen": 0, "pairs_routed": 0, "routed_share": 0.0, "billed": 0,
                        "spend_usd": 0.0}
            return {**out, "pairs_seen": d.pairs_seen, "pairs_routed": d.pairs_routed,
                    "routed_share": d.pairs_routed / d.pairs_seen if d.pairs_seen else 0.0,
                    "billed": d.ledger.calls, "spend_usd": d.ledger.spend_usd, "failed_pairs": d.ledger.failures,
                    "cached": d.ledger.cached, "inconsistent": d.inconsistent, "failures": dict(d.failures),
                    "in_flight_calls": d.reserved, **({"judged_by": list(self.judged_by)} if self.judged_by else {})}

    def state_dict(self) -> dict:
        with self._lock:
            return {"batches": self.batches, "groups": self.groups, **self.health.state_dict(),
                    "in_flight": sorted(self._in_flight), "judged_by": list(self.judged_by),
                    "decision": self.decision.state_dict() if self.decision is not None else None}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self.batches, self.groups = int(state["batches"]), int(state["groups"])
            self.health.load_state_dict(state)
            self._owed = {int(k) for k in state.get("in_flight", ())}
            if len(state.get("judged_by", ())) == len(self.judged_by):  # the same cascade as the saved run's
                self.judged_by = [int(c) for c in state["judged_by"]]
            if self.decision is not None and state.get("decision") is not None:
                self.decision.load_state_dict(state["decision"])


    def use_journal(self, path) -> int:
        """Writes every judge call to ``path`` before it is sent and when it returns
        (:class:`~lit_route.routing.journal.PaidJournal`), and first charges the ledger with what an earlier
        process wrote there for batches it never charged (killed with calls in flight: batches in flight when its
        last state was saved, or routed after it), a call it sent and never read the answer of as billed at an
        estimated price. Returns those calls. Call it after :meth:`load_state_dict`, and save the state right
        after."""
        from lit_route.routing.journal import PaidJournal

        if self.decision is None:
            return 0
        journal = PaidJournal(path)
        with self._lock:
            keys: set[int] = set()

            def owed(key: int) -> bool:
                if key in self._owed or key >= self.batches:
                    keys.add(key)
                    return True
                return False

            calls = journal.load(owed)
            for key in keys:
                paid = journal.take(key)
                self.decision.ledger.charge(sum(c for c, _ in paid), sum(usd for _, usd in paid), by_judge=paid)
            self.batches = max([self.batches, *(k + 1 for k in keys)])  # new batches never reuse a journaled key
            self._owed = set()
            self.journal = journal
        return calls


@dataclass
class _Part:
    """The groups of one size in a batch: their rows in the batch, prompts, completions, PM scores ``s`` and
    uncertainties ``u`` (B, K, K), the PM's own scores ``pm_s`` and the judged mask (``s`` and ``judged`` are
    filled in by routing)."""

    rows: list[int]
    prompts: list
    completions: list[list[str]]
    s: torch.Tensor
    u: torch.Tensor
    pm_s: torch.Tensor
    judged: torch.Tensor


def build_decision(judge, *, cache: str | None = None, cascade: Sequence = (), max_calls_per_step=None,
                   max_calls_total=None, max_spend_usd=None, **routing):
    """A :class:`~lit_route.routing.decision.RoutingDecision` with verdict caches and a ledger from flat settings
    (those of the routing callback). ``cascade`` items: objects with ``judge``, ``fraction`` and ``cache``."""
    from lit_route.judges.cache import CachedJudge
    from lit_route.routing.budget import BudgetLedger
    from lit_route.routing.decision import RoutingDecision

    stages = [(CachedJudge(st.judge, st.cache) if getattr(st, "cache", None) else st.judge, st.fraction)
              for st in cascade or ()]
    ledger = BudgetLedger(max_calls_per_step, max_calls_total, max_spend_usd)
    return RoutingDecision(CachedJudge(judge, cache) if cache else judge, ledger=ledger, stages=stages, **routing)
