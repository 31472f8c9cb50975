"""``UncertaintyRouting``: the callback that sends the PM's most uncertain pairs to a strong judge."""

from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch

from lit_route.checks import check_file_path, check_nonnegative
from lit_route.eval.export import judged_record
from lit_route.judges.base import JudgeBackend, check_judge
from lit_route.judges.cache import CachedJudge, spent_by_run
from lit_route.policy.pipeline import gather_ranks
from lit_route.rewards.pairwise import upper_pairs
from lit_route.routing.budget import BudgetLedger
from lit_route.routing.cascade import CascadeStage
from lit_route.routing.controller import BudgetTarget, Controller
from lit_route.routing.decision import ROUTERS, Assignment, JudgePlan, RoutingDecision
from lit_route.routing.journal import PaidJournal

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
    or a judge that raises, leaves the PM's score and is counted; a judge that raises in
    ``max_consecutive_errors`` steps in a row stops the run. The ledger and counters are saved in checkpoints.
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
        max_consecutive_errors: Steps in a row in which the judge may raise before the run stops (``None``: never).
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
        self.max_consecutive_errors = max_consecutive_errors
        self.consecutive_errors = 0
        self.batches = None  # sampled batches so far: keys the random draws (None: not known yet, see _key)
        self._last_step_started: float | None = None
        self._step_seconds = 0.0
        self._pending: PendingJudge | None = None
        self._inflight: dict[int, PendingJudge] = {}
        # pipelined rewards (the module's reward_pipeline > 0): batches' calls stay in flight across steps
        self._pipelined, self._world = False, 1
        self._journal: PaidJournal | None = None
        self._restore: list | None = None
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
            self.audit.observe_pool(ctx.scores[:, ii, jj], routed_mask)  # the pool of the audit's PPI estimates
            plan = self.decision.plan(Assignment(assign, routed_mask, audit), list(zip(ii.tolist(), jj.tolist(), strict=True)),
                                      ctx.prompts, ctx.completions)
            reserved = self.decision.reserve(self._assignment)
            seed = self.decision.seed + key * 1009 + trainer.global_rank
            world, rank = trainer.world_size, trainer.global_rank
            spare = self.decision.spare_calls // world + int(rank < self.decision.spare_calls % world)
            future = self.decision.submit(plan, seed, self._metered(key), spare_calls=spare)
            self.batches = key + 1
            ctx.key = key
            self._pending = PendingJudge(future, plan.keys, time.perf_counter(), plan, key, seed, reserved,
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
        if hasattr(self.decision.controller, "observe"):  # every rank's audit, so every rank's τ stays the same
            self.decision.observe_audit([p for rank in gather_ranks(merged.audited, trainer.world_size) for p in rank])
        self._export([judged_record(ctx.prompts[bi], ctx.completions[bi][i], ctx.completions[bi][j], score,
                                    f"step{trainer.global_step}-rank{trainer.global_rank}-{bi}-{i}-{j}", "rloo",
                                    str(self.judge.model))
                      for bi, i, j, score in merged.decisive] if self.export_judged else [], trainer)
        totals = merged.totals
        if trainer.world_size > 1:  # every rank charges the same global amounts, so ledgers stay equal
            totals = trainer.strategy.reduce(totals.to(module.device), reduce_op="sum").cpu()
        self.decision.release(pending.reserved)
        metrics = self.decision.close(totals)
        errors = metrics.pop("judge/errors")
        ctx.stats.update({**metrics, **latency_metrics(merged.latencies), **pending.control})
        # decided on the global count, so that every rank stops together
        self.consecutive_errors = self.consecutive_errors + 1 if errors else 0
        if self.max_consecutive_errors is not None and self.consecutive_errors > self.max_consecutive_errors:
            raise RuntimeError(f"the judge raised in {self.consecutive_errors} consecutive steps "
                               f"(max_consecutive_errors={self.max_consecutive_errors})") from merged.error

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
        """At the first batch of a pipelined run: the run's id (rank 0's), its paid-calls journal, and the calls of
        batches that were pending in the checkpoint, asked again (the cache answers those the killed process got;
        the journal charges what it paid)."""
        hparams = getattr(module, "hparams", None)
        if self._journal is not None or not (hparams is not None and hparams.get("reward_pipeline", 0)):
            return
        self._pipelined, self._world = True, trainer.world_size
        rank = trainer.global_rank if trainer.world_size > 1 else 0
        root = Path(getattr(trainer, "default_root_dir", None) or ".")
        self._journal = PaidJournal(root / "judge_journal" / f"{self.run_id}.rank{rank}.jsonl")
        restored = self._restore[rank] if self._restore and rank < len(self._restore) else []
        owed, first_new = {int(r["key"]) for r in restored}, self._key(trainer, module)
        self._journal.load(lambda key: key in owed or key >= first_new)
        for r in restored:
            plan = JudgePlan([tuple(k) for k in r["keys"]], {tuple(k[:3]): (k[3], k[4], k[5]) for k in r["kinds"]},
                             [[tuple(item) for item in items] for items in r["items"]])
            key = int(r["key"])
            future = self.decision.submit(plan, int(r["seed"]), self._metered(key))
            self._inflight[key] = PendingJudge(future, plan.keys, time.perf_counter(), plan, key, int(r["seed"]),
                                               int(r["reserved"]), dict(r["control"]))
            self.decision.reserved += int(r["reserved"])
        self._restore = None

    def _metered(self, key: int) -> list | None:
        return [self._journal.meter(j, key) for j in self.decision.judges] if self._journal is not None else None

    def _inflight_state(self) -> list[dict]:
        return [{"key": p.key, "seed": p.seed, "reserved": p.reserved, "control": p.control,
                 "keys": [list(k) for k in p.plan.keys],
                 "kinds": [[*k, *v] for k, v in p.plan.kinds.items()],
                 "items": [[list(item) for item in items] for items in p.plan.items]}
                for p in self._inflight.values()]

    # --- checkpointed state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {**self.decision.state_dict(), "consecutive_errors": self.consecutive_errors, "batches": self.batches}
        state["run_id"] = self.run_id
        if self._pipelined:  # every rank's batches in flight (rank 0 writes the checkpoint)
            state["inflight"] = gather_ranks(self._inflight_state(), self._world)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.decision.load_state_dict(state_dict)
        self.consecutive_errors = int(state_dict.get("consecutive_errors", 0))
        self.batches = state_dict.get("batches")
        self._restore = state_dict.get("inflight")
        if state_dict.get("run_id"):
            self._set_run_id(state_dict["run_id"])
            self._run_id_agreed = True
            if "inflight" not in state_dict:
                # calls paid after this checkpoint was written (a killed step) are charged now: the cache's spend
                # records are the truth. A pipelined run's journal charges them with their batches instead.
                self.decision.ledger.reconcile(*spent_by_run(self.decision.judges, self.run_id))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for pending in self._inflight.values():
            if pending.future is not None:
                pending.future.cancel()  # a step that raised left its judge call behind
        self._inflight.clear()
        self._pending = None
        if stage == "fit" and self.decision.audit_fraction > 0:  # the run's answer to "did routing pay off?"
            L.pytorch.utilities.rank_zero_info(f"routing audit: {self.audit.verdict()}")


class PendingJudge(NamedTuple):
    """A batch's judge calls in flight (``routed``: the local pairs asked, in the plan's order)."""

    future: Future | None
    routed: list
    started: float
    plan: JudgePlan
    key: int
    seed: int
    reserved: int
    control: dict


def latency_metrics(latencies: list[float]) -> dict[str, float]:
    """``judge/latency_p50``, ``_p95``, ``_max`` over the paid calls of a batch's pairs (this rank's)."""
    if not latencies:
        return {}
    t = torch.tensor(latencies, dtype=torch.float64)
    return {"judge/latency_p50": float(t.quantile(0.5)), "judge/latency_p95": float(t.quantile(0.95)),
            "judge/latency_max": float(t.max()), "judge/max_latency_s": float(t.max())}
