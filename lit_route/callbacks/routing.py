"""``UncertaintyRouting``: the callback that sends the PM's most uncertain pairs to a strong judge."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import lightning as L
import torch

from lit_route.checks import check_file_path, check_nonnegative
from lit_route.eval.export import judged_record
from lit_route.judges.base import JudgeBackend, check_judge
from lit_route.judges.cache import CachedJudge
from lit_route.policy.pipeline import gather_ranks
from lit_route.rewards.pairwise import upper_pairs
from lit_route.routing.allowance import Hold
from lit_route.routing.budget import BudgetLedger
from lit_route.routing.cascade import CascadeStage
from lit_route.routing.controller import BudgetTarget, Controller
from lit_route.routing.decision import ROUTERS, Assignment, RoutingDecision
from lit_route.routing.health import JudgeHealth, failure_text
from lit_route.routing.journal import PaidJournal, reconcile_with_caches
from lit_route.routing.plan import JudgePlan, PendingJudge, latency_metrics

log = logging.getLogger(__name__)

__all__ = ["ROUTERS", "CascadeStage", "UncertaintyRouting"]


class UncertaintyRouting(L.Callback):
    """Routes pairs of each RLOO group to a judge, within a budget, overlapped with the step.

    Per step the decision is made on the (globally gathered) upper-triangle pairs of the group score matrices:

    - ``router: uncertainty`` judges the pairs with the highest ū (the method);
    - ``router: random`` judges as many pairs, drawn at random (the paper's baseline at equal judge calls);
    - ``router: margin`` judges the pairs with the smallest |d| (no uncertainty model needed);
    - ``router: learned`` judges the pairs of highest P(PM wrong) under a model fitted on validation pairs
      (``delegation``: :mod:`lit_route.uncertainty.delegation`).

    How many: ``fraction`` of the pairs (top-k), or with ``threshold`` every pair with ū > τ (``random`` then
    draws as many pairs as the threshold selects), or with a ``controller`` a τ moved between steps so that the
    realised share tracks ``target`` (a fixed fraction, a share of the provider's rate limit, or a spend pace;
    see :mod:`lit_route.routing.controller`). ``audit_fraction`` sends a further uniformly random share of the
    pairs to the judge whatever their ū: the judge's verdicts there estimate, without bias, how often PM and judge
    agree and how many more PM answers a routed call overturns than a random one (``audit/*`` metrics).
    ``cascade`` adds cheaper judges for the bands below: the main judge answers the top (routed) pairs, the first
    stage's judge the next ``fraction`` of pairs by the router's priority, and so on (PM → cheap → strong). The caps (``max_calls_per_step``, ``max_calls_total``,
    ``max_spend_usd``) count billed judge requests, so a pair costs two calls with ``order: both`` and a cached
    verdict costs nothing; over a cap the audit sample is paid first (so it stays uniform and its estimates unbiased),
    then the router's own priority decides which pairs keep their place. The decision itself is
    :class:`~lit_route.routing.decision.RoutingDecision`; this callback adds Lightning's hooks, the DDP gather and
    reduce, and checkpoint state.

    The routed pairs are judged on the process's judge event loop while the module computes reference
    log-probabilities; a verdict replaces ``S_ij`` by ``±c`` (tie: 0) and ``S_ji`` by its negative. A failed call,
    or a judge that raises, leaves the PM's score and is counted; a judge that raises, or fails every routed pair
    for a reason no retry mends (a rejected key, an unreachable server), in more than ``max_consecutive_errors``
    steps in a row stops the run (:class:`~lit_route.routing.health.JudgeFailing`). The ledger and counters are saved in checkpoints.
    With the module's ``reward_pipeline: s`` a batch's calls stay in flight for s steps; the batches in flight,
    and a journal of the calls paid, make a resumed run pay each call once (``docs/pipeline.md``).

    Args:
        judge: The judge backend (``class_path`` + ``init_args``).
        router: ``uncertainty``, ``random``, ``margin`` or ``learned``.
        fraction: Share of each step's pairs to judge; ignored when ``threshold`` is set.
        threshold: Judge every pair with ū above this instead (``uncertainty`` and ``random`` routers).
        max_calls_per_step: Cap on billed judge requests per step (all ranks together).
        max_calls_total: Cap on billed judge requests over the run.
        max_spend_usd: Stop judging once the estimated spend reaches this.
        verdict_logit: c: the logit a verdict is worth (2 in the paper).
        order: Display order of the judge: ``random`` (default), ``both`` (two calls per pair) or ``fixed``.
        cache: sqlite verdict cache (``None``: no cache).
        seed: Seed of the display order and of the random router.
        max_consecutive_errors: Steps in a row in which the judge may raise, or fail every routed pair with a client
            error or a connection failure, before the run stops (``None``: never).
        controller: Moves τ between steps (``QuantileTracker`` or ``PIController``); replaces ``threshold``.
        target: What the controller aims for (default: ``fraction`` of the pairs).
        audit_fraction: Share of each step's pairs judged at random on top of the routed ones.
        cascade: Cheaper judges for the bands below the routed pairs, in order (each its own judge and cache).
        export_judged: Append every decisive verdict of the main judge to this preference file (``prompt``,
            ``chosen``, ``rejected``: the verdict is the label), for ``pm fit`` to learn from; under DDP each rank
            writes its own file (``.rankN`` before the suffix).
        delegation: The ``learned`` router's model file (fitted on ``|d|`` and ``log ū``).
    """

    def __init__(
        self,
        judge: JudgeBackend,
        router: str = "uncertainty",
        fraction: float = 0.25,
        threshold: float | None = None,
        max_calls_per_step: int | None = None,
        max_calls_total: int | None = None,
        max_spend_usd: float | None = None,
        verdict_logit: float = 2.0,
        order: str = "random",
        cache: str | None = None,
        seed: int = 0,
        max_consecutive_errors: int | None = 3,
        controller: Controller | None = None,
        target: BudgetTarget | None = None,
        audit_fraction: float = 0.0,
        cascade: list[CascadeStage] | None = None,
        export_judged: str | None = None,
        delegation: str | None = None,
    ):
        check_judge(judge)
        check_file_path("cache", cache, "judge_cache.sqlite")
        check_file_path("export_judged", export_judged, "judged.jsonl")
        for i, stage in enumerate(cascade or []):
            check_judge(stage.judge, f"cascade[{i}].judge")
            check_file_path(f"cascade[{i}].cache", stage.cache, "judge_cache.sqlite")
        if max_consecutive_errors is not None:
            check_nonnegative("max_consecutive_errors", max_consecutive_errors, integer=True)
        main = CachedJudge(judge, cache) if cache else judge
        stages = [(CachedJudge(st.judge, st.cache) if st.cache else st.judge, st.fraction) for st in cascade or []]
        self.decision = RoutingDecision(main, router, fraction, threshold,
                                        BudgetLedger(max_calls_per_step, max_calls_total, max_spend_usd),
                                        verdict_logit, order, seed, controller, target, audit_fraction, stages,
                                        delegation=delegation)
        self.export_judged = export_judged
        self.health = JudgeHealth(max_consecutive_errors, unit="steps")
        self.batches = None  # sampled batches so far: keys the random draws (None: not known yet, see _key)
        self._last_step_started: float | None = None
        self._step_seconds = 0.0
        self._pending: PendingJudge | None = None
        self._inflight: dict[int, PendingJudge] = {}
        # pipelined rewards (the module's reward_pipeline > 0): batches' calls stay in flight across steps
        self._pipelined, self._world = False, 1
        self._journal: PaidJournal | None = None
        self._restore: list | None = None
        self._set_up, self._resumed = False, False  # the first batch's setup done; state loaded from a checkpoint
        self._run_id_agreed = False
        self._set_run_id(uuid.uuid4().hex)

    # the decision object's state, under the names configs, tests and benchmarks read
    judge = property(lambda self: self.decision.judge)
    stages = property(lambda self: self.decision.stages)
    ledger = property(lambda self: self.decision.ledger)
    controller = property(lambda self: self.decision.controller)
    audit = property(lambda self: self.decision.audit)
    order = property(lambda self: self.decision.order)
    seed = property(lambda self: self.decision.seed)
    pairs_seen = property(lambda self: self.decision.pairs_seen)
    pairs_routed = property(lambda self: self.decision.pairs_routed)
    inconsistent = property(lambda self: self.decision.inconsistent)
    failures = property(lambda self: self.decision.failures)

    def _set_run_id(self, run_id: str) -> None:
        """The key of this run's spend records in the verdict caches and of its paid-calls journal (kept in
        checkpoints)."""
        self.run_id = run_id
        for judge in self.decision.judges:
            if isinstance(judge, CachedJudge):
                judge.run_id = run_id

    def _agree_run_id(self, trainer, module) -> None:
        """Every rank records its calls under rank 0's id (agreed once, through the collective routing uses, so
        the Trainer and the Fabric loop agree alike; a loaded id is the same on every rank already)."""
        if self._run_id_agreed or trainer.world_size == 1:
            self._run_id_agreed = True
            return
        mine = torch.tensor(list(bytes.fromhex(self.run_id)), dtype=torch.long, device=module.device)
        self._set_run_id(bytes(trainer.strategy.all_gather(mine).cpu()[0].tolist()).hex())
        self._run_id_agreed = True

    # --- routing decision -------------------------------------------------------------------------------------
    def _key(self, trainer, module=None) -> int:
        """The count of sampled batches (the same on every rank); from an older checkpoint, the step times the
        batches per step."""
        if self.batches is None:
            acc = getattr(getattr(module, "hparams", None), "get", lambda *_: 1)("accumulate_batches", 1)
            self.batches = trainer.global_step * int(acc or 1)
        return self.batches

    def _route(self, trainer, module, d_pairs: torch.Tensor, u_pairs: torch.Tensor):
        """(B, P) local upper-triangle scores and uncertainties -> local (B, P) judge assignment (−1: the PM,
        0: the main judge, s: cascade stage s), routed mask and audit mask, decided on the global batch."""
        world = trainer.world_size
        if world > 1:  # collectives need tensors on the module's device (NCCL has no CPU tensors)
            both = torch.stack([d_pairs, u_pairs]).to(module.device)
            both = trainer.strategy.all_gather(both).cpu()  # (world, 2, B, P)
            d_all, u_all = both[:, 0].reshape(-1, u_pairs.shape[-1]), both[:, 1].reshape(-1, u_pairs.shape[-1])
        else:
            d_all, u_all = d_pairs, u_pairs
        full = self.decision.route(d_all, u_all, self._key(trainer, module), step=trainer.global_step,
                                   step_seconds=self._step_seconds)
        self._control = full.control
        b = u_pairs.shape[0]
        rank = trainer.global_rank if world > 1 else 0
        local = full.rows(slice(rank * b, (rank + 1) * b))
        self._assignment = full
        return local.assign, local.routed, local.audit

    # --- reward hooks ------------------------------------------------------------------------------------------
    def on_pairwise_scores(self, trainer, module, ctx) -> None:
        now = time.perf_counter()
        if self._last_step_started is not None:
            self._step_seconds = now - self._last_step_started
        self._last_step_started = now
        with ctx.timer("routing"):
            ii, jj = upper_pairs(ctx.uncertainty.shape[1])
            self._control = {}
            key = self._key(trainer, module)
            self._agree_run_id(trainer, module)
            self._setup_pipeline(trainer, module)
            assign, routed_mask, audit = self._route(trainer, module, ctx.scores[:, ii, jj].float(),
                                                     ctx.uncertainty[:, ii, jj].float())
            plan = self.decision.plan(Assignment(assign, routed_mask, audit), list(zip(ii.tolist(), jj.tolist(), strict=True)),
                                      ctx.prompts, ctx.completions)
            hold = self.decision.reserve(self._assignment)
            seed = self.decision.seed + key * 1009 + trainer.global_rank
            future = self.decision.submit(plan, seed, self._metered(key), spare_calls=self._reasks(trainer, hold))
            self.batches = key + 1
            ctx.key = key
            self._pending = PendingJudge(future, plan.keys, time.perf_counter(), plan, key, seed, hold,
                                         dict(self._control))
            self._inflight[key] = self._pending

    def on_before_rewards(self, trainer, module, ctx) -> None:
        self._agree_run_id(trainer, module)
        self._setup_pipeline(trainer, module)  # a resumed run may finish restored batches before sampling one
        key = getattr(ctx, "key", None)
        if key is None and self._pending is not None:  # a context from elsewhere: the batch routed last
            key = self._pending.key
        pending = self._inflight.pop(key, None)
        if self._pending is not None and self._pending.key == key:
            self._pending = None
        if pending is not None:
            self._finish(trainer, module, ctx, pending)

    def _finish(self, trainer, module, ctx, pending: PendingJudge) -> None:
        with ctx.timer("judge_wait"):
            try:
                result = pending.future.result() if pending.future is not None else [[] for _ in self.decision.judges]
            except Exception as err:  # a judge that raises (local model error, locked cache) costs the step nothing
                result = err
                log.warning("judge raised %s: %s; the %d routed pairs keep their PM scores",
                            type(err).__name__, err, len(pending.routed))
        ctx.stats["judge_elapsed_s"] = time.perf_counter() - pending.started
        paid = self._journal.take(pending.key) if self._journal is not None else None
        merged = self.decision.apply(pending.plan, result, ctx.scores, ctx.pm_scores, ctx.judged, paid,
                                     uncertainty=getattr(ctx, "uncertainty", None))
        audited = merged.audited  # every rank's, so that every rank's controller learns the same and τ stays equal
        if hasattr(self.decision.controller, "observe"):
            audited = [p for rank in gather_ranks(merged.audited, trainer.world_size) for p in rank]
        self._export([judged_record(ctx.prompts[bi], ctx.completions[bi][i], ctx.completions[bi][j], score,
                                    f"step{trainer.global_step}-rank{trainer.global_rank}-{bi}-{i}-{j}", "rloo",
                                    str(self.judge.model))
                      for bi, i, j, score in merged.decisive] if self.export_judged else [], trainer)
        totals = merged.totals
        if trainer.world_size > 1:  # every rank charges the same global amounts, so ledgers stay equal
            totals = trainer.strategy.reduce(totals.to(module.device), reduce_op="sum").cpu()
        self.decision.release(pending.reserved)
        metrics = self.decision.close(totals, audited)
        errors = metrics.pop("judge/errors")
        ctx.stats.update({**metrics, **latency_metrics(merged.latencies), **pending.control})
        # decided on the global counts, so that every rank stops together
        error = merged.error or (RuntimeError("a judge raised on another rank") if errors else None)
        answers = [] if isinstance(result, BaseException) else result
        failing = self.health.record(int(metrics["judge/routed_pairs"]), int(metrics["judge/lasting_failures"]),
                                     error, failure_text(answers))
        if failing is not None:
            raise failing

    def _export(self, records: list[dict | None], trainer) -> None:
        records = [r for r in records if r is not None]
        if not self.export_judged or not records:
            return
        path = Path(self.export_judged)
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:  # appended per step: a killed run keeps what it paid for
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    # --- pipelined rewards -------------------------------------------------------------------------------------
    def _setup_pipeline(self, trainer, module) -> None:
        """At the first batch: the run's id (rank 0's), its paid-calls journal (under the run's folder; a pipelined
        run keeps one in any case), the ledger reconciled with the verdict caches' spend records when resuming,
        and the calls of batches that were pending in the checkpoint, asked again (the cache answers those the
        killed process got; the journal charges what it paid)."""
        if self._set_up:
            return
        self._set_up = True
        hparams = getattr(module, "hparams", None)
        if hparams is not None and hparams.get("reward_pipeline", 0):
            self._pipelined, self._world = True, trainer.world_size
        rank = trainer.global_rank if trainer.world_size > 1 else 0
        root = getattr(trainer, "default_root_dir", None)
        restored = self._restore[rank] if self._restore and rank < len(self._restore) else []
        if root or self._pipelined:
            self._journal = PaidJournal(Path(root or ".") / "judge_journal" / f"{self.run_id}.rank{rank}.jsonl")
            owed, first_new = {int(r["key"]) for r in restored}, self._key(trainer, module)
            self._journal.load(lambda key: key in owed or key >= first_new)
        if self._resumed:
            self._reconcile(trainer, module)
        for r in restored:
            plan = JudgePlan([tuple(k) for k in r["keys"]], {tuple(k[:3]): (k[3], k[4], k[5]) for k in r["kinds"]},
                             [[tuple(item) for item in items] for items in r["items"]])
            key = int(r["key"])
            hold = self.decision.reserve(Hold.from_state(r["reserved"]))  # held as when it was routed
            spare = self._reasks(trainer, hold)
            lost = self._journal.lost_by_key.get(key, 0) if self._journal is not None else 0
            if lost:  # calls the killed process sent are charged: asking again spends only what is left of the hold
                plan, spare = plan.within(len(plan.keys) * self.decision.calls_per_pair + spare - lost,
                                          self.decision.calls_per_pair)
            future = self.decision.submit(plan, int(r["seed"]), self._metered(key), spare_calls=spare)
            self._inflight[key] = PendingJudge(future, plan.keys, time.perf_counter(), plan, key, int(r["seed"]),
                                               hold, dict(r["control"]))
        self._restore = None

    @staticmethod
    def _reasks(trainer, hold: Hold) -> int:
        """This rank's share of the re-asks a batch holds (the batch is decided globally, asked per rank)."""
        world, rank = trainer.world_size, trainer.global_rank if trainer.world_size > 1 else 0
        return hold.reasks // world + int(rank < hold.reasks % world)

    def _paid_so_far(self, pending: PendingJudge) -> list[tuple[int, float]]:
        """Billed calls and spend per judge of a batch that will not be merged: the journal's record, or the
        answers that came back."""
        if self._journal is not None:
            return self._journal.take(pending.key)
        future = pending.future
        if future is None or not future.done() or future.cancelled() or future.exception() is not None:
            return []
        return [(sum(jd.billed for jd in per_judge), sum(jd.cost_usd for jd in per_judge))
                for per_judge in future.result()]

    def _reconcile(self, trainer, module) -> None:
        """Calls paid after the checkpoint (a killed step) that a judge's cache recorded and the journal lacks are
        charged now, judge by judge; what the journals hold for batches not yet charged (every rank's) is charged
        with those batches instead."""
        judges = self.decision.judges
        pending = self._journal.pending(len(judges)) if self._journal is not None else [(0, 0.0)] * len(judges)
        if trainer.world_size > 1 and any(isinstance(j, CachedJudge) for j in judges):
            both = trainer.strategy.reduce(torch.tensor(pending, dtype=torch.float64).to(module.device),
                                           reduce_op="sum").cpu().tolist()
            pending = [(int(c), usd) for c, usd in both]
        found = self._journal is not None and self._journal.found  # the killed process's journal, if it had one
        reconcile_with_caches(self.decision.ledger, judges, self.run_id, pending if found else None)

    def _metered(self, key: int) -> list | None:
        if self._journal is None:
            return None
        return [self._journal.meter(j, key, index) for index, j in enumerate(self.decision.judges)]

    def _inflight_state(self) -> list[dict]:
        return [{"key": p.key, "seed": p.seed, "reserved": p.reserved.state_dict(), "control": p.control,
                 "keys": [list(k) for k in p.plan.keys],
                 "kinds": [[*k, *v] for k, v in p.plan.kinds.items()],
                 "items": [[list(item) for item in items] for items in p.plan.items]}
                for p in self._inflight.values()]

    # --- checkpointed state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {**self.decision.state_dict(), **self.health.state_dict(), "batches": self.batches}
        state["run_id"] = self.run_id
        if self._pipelined:  # every rank's batches in flight (rank 0 writes the checkpoint)
            state["inflight"] = gather_ranks(self._inflight_state(), self._world)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.decision.load_state_dict(state_dict)
        self.health.load_state_dict(state_dict)
        self.batches = state_dict.get("batches")
        self._restore = state_dict.get("inflight")
        if state_dict.get("run_id"):
            self._set_run_id(state_dict["run_id"])
            self._run_id_agreed = True
            self._resumed = True  # calls paid after this checkpoint are charged at the first batch (_reconcile)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for pending in self._inflight.values():  # batches a crash left behind: charge what they paid
            if pending.future is not None:
                pending.future.cancel()
            paid = self._paid_so_far(pending)
            self.decision.ledger.charge(sum(c for c, _ in paid), sum(usd for _, usd in paid), by_judge=paid)
            self.decision.release(pending.reserved)
        self._inflight.clear()
        self._pending = None
        if stage == "fit" and self.decision.audit_fraction > 0:  # the run's answer to "did routing pay off?"
            L.pytorch.utilities.rank_zero_info(f"routing audit: {self.audit.verdict()}")
