"""``UncertaintyRouting``: the callback that sends the PM's most uncertain pairs to a strong judge."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from lit_route.checks import check_choice, check_fraction, check_nonnegative
from lit_route.eval.export import judged_record
from lit_route.judges.base import JudgeBackend, check_judge
from lit_route.judges.cache import CachedJudge
from lit_route.judges.loop import submit
from lit_route.judges.pairwise import ORDERS, judge_pairs
from lit_route.rewards.pairwise import upper_pairs, verdict_logits
from lit_route.routing.audit import AuditTally
from lit_route.routing.budget import BudgetLedger
from lit_route.routing.controller import BudgetTarget, Controller, target_fraction
from lit_route.routing.routers import count_for_fraction

log = logging.getLogger(__name__)

ROUTERS = ("uncertainty", "random", "margin")


@dataclass
class CascadeStage:
    """A cheaper judge for the band of pairs just below the main judge's.

    Args:
        judge: The judge backend (its own policy and prices).
        fraction: Share of each step's pairs in its band.
        cache: Its sqlite verdict cache (``None``: none).
    """

    judge: JudgeBackend
    fraction: float
    cache: str | None = None


def _prompt_text(messages) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


class UncertaintyRouting(L.Callback):
    """Routes pairs of each RLOO group to a judge, within a budget, overlapped with the step.

    Per step the decision is made on the (globally gathered) upper-triangle pairs of the group score matrices:

    - ``router: uncertainty`` judges the pairs with the highest ū (the method);
    - ``router: random`` judges as many pairs, drawn at random (the paper's baseline at equal judge calls);
    - ``router: margin`` judges the pairs with the smallest |d| (no uncertainty model needed).

    How many: ``fraction`` of the pairs (top-k), or with ``threshold`` every pair with ū > τ (``random`` then
    draws as many pairs as the threshold selects), or with a ``controller`` a τ moved between steps so that the
    realised share tracks ``target`` (a fixed fraction, a share of the provider's rate limit, or a spend pace;
    see :mod:`lit_route.routing.controller`). ``audit_fraction`` sends a further uniformly random share of the
    pairs to the judge whatever their ū: the judge's verdicts there estimate, without bias, how often PM and judge
    agree and how many more PM answers a routed call overturns than a random one (``audit/*`` metrics).
    ``cascade`` adds cheaper judges for the bands below: the main judge answers the top (routed) pairs, the first
    stage's judge the next ``fraction`` of pairs by the router's priority, and so on (PM → cheap → strong). The caps (``max_calls_per_step``, ``max_calls_total``,
    ``max_spend_usd``) count billed judge requests, so a pair costs two calls with ``order: both`` and a cached
    verdict costs nothing; over a cap, the router's own priority decides which pairs keep their place.

    The routed pairs are judged on the process's judge event loop while the module computes reference
    log-probabilities; a verdict replaces ``S_ij`` by ``±c`` (tie: 0) and ``S_ji`` by its negative. A failed call,
    or a judge that raises, leaves the PM's score and is counted; a judge that raises in
    ``max_consecutive_errors`` steps in a row stops the run. The ledger and counters are saved in checkpoints.

    Args:
        judge: The judge backend (``class_path`` + ``init_args``).
        router: ``uncertainty``, ``random`` or ``margin``.
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
    ):
        check_judge(judge)
        check_choice("router", router, ROUTERS)
        check_choice("order", order, ORDERS)
        check_fraction("fraction", fraction)
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"threshold: expected a finite number, got {threshold}")
        if (threshold is not None or controller is not None) and router == "margin":
            raise ValueError("threshold: applies to the uncertainty and random routers; the margin router takes fraction")
        if threshold is not None and controller is not None:
            raise ValueError("controller: moves the threshold itself; give a controller or a threshold, not both")
        check_fraction("audit_fraction", audit_fraction)
        for i, stage in enumerate(cascade or []):
            check_judge(stage.judge, f"cascade[{i}].judge")
            check_fraction(f"cascade[{i}].fraction", stage.fraction)
        if not math.isfinite(verdict_logit) or verdict_logit <= 0:
            raise ValueError(f"verdict_logit: expected a finite number > 0, got {verdict_logit}")
        if max_consecutive_errors is not None:
            check_nonnegative("max_consecutive_errors", max_consecutive_errors, integer=True)
        self.judge = CachedJudge(judge, cache) if cache else judge
        self.stages = [CachedJudge(st.judge, st.cache) if st.cache else st.judge for st in cascade or []]
        self.stage_fractions = [st.fraction for st in cascade or []]
        self.export_judged = export_judged
        self.router, self.fraction, self.threshold = router, fraction, threshold
        self.ledger = BudgetLedger(max_calls_per_step, max_calls_total, max_spend_usd)
        self.c, self.order, self.seed = verdict_logit, order, seed
        self.max_consecutive_errors = max_consecutive_errors
        self.controller = controller
        self.target = target or BudgetTarget(kind="fraction", fraction=fraction)
        self.audit_fraction = audit_fraction
        self.audit = AuditTally()
        self._last_step_started: float | None = None
        self._step_seconds = 0.0
        self.pairs_seen = 0
        self.pairs_routed = 0
        self.inconsistent = 0
        self.consecutive_errors = 0
        self.failures: collections.Counter = collections.Counter()
        self._pending: tuple | None = None

    # --- routing decision -------------------------------------------------------------------------------------
    def _priority(self, d: torch.Tensor, u: torch.Tensor, step: int) -> torch.Tensor:
        """Higher first: ū (uncertainty), −|d| (margin), or a uniform draw seeded by the step (random), so every
        rank draws the same numbers for the same global batch."""
        if self.router == "uncertainty":
            return u.double()
        if self.router == "margin":
            return -d.abs().double()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.rand(u.shape, generator=generator, dtype=torch.float64)

    def _how_many(self, u_all: torch.Tensor, step: int) -> int:
        """Pairs to route this step, before the caps."""
        if self.controller is not None:
            calls_per_pair = 2 if self.order == "both" else 1
            usd_per_call = self.ledger.spend_usd / self.ledger.calls if self.ledger.calls else 0.0
            target = target_fraction(self.target, u_all.numel(), calls_per_pair, step, self._step_seconds,
                                     self.ledger.spend_usd, usd_per_call)
            if self.controller.tau is None:
                self.controller.calibrate(u_all, target)
            tau = self.controller.threshold(u_all)
            k = int((u_all > tau).sum())
            self.controller.update(u_all, target)  # τ for the next step, from what this one would route
            self._control = {"judge/tau": tau, "judge/target_fraction": target}
            return k
        if self.threshold is not None:
            return int((u_all > self.threshold).sum())
        return count_for_fraction(u_all.numel(), self.fraction)

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
        n, step = u_all.numel(), trainer.global_step
        allowance = self.ledger.allowance() // (2 if self.order == "both" else 1)
        k = min(self._how_many(u_all, step), allowance)
        order = torch.argsort(self._priority(d_all, u_all, step).flatten(), descending=True, stable=True)
        assign = torch.full((n,), -1, dtype=torch.long)
        assign[order[:k]] = 0
        routed = assign == 0
        audit = torch.zeros(n, dtype=torch.bool)
        if self.audit_fraction > 0:  # uniform over all pairs, from its own stream, whatever the router chose
            draw = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7_919 + step + 1))
            audit[draw[: count_for_fraction(n, self.audit_fraction)]] = True
            extra = (audit & (assign != 0)).nonzero().flatten()
            audit[extra[max(allowance - k, 0):]] = False  # the caps bind audits after routed pairs
            assign[audit] = 0
        left = allowance - int((assign == 0).sum())
        for stage, fraction in enumerate(self.stage_fractions, start=1):  # the bands below, by the same priority
            free = order[assign[order] == -1]
            take = free[: max(min(count_for_fraction(n, fraction), left), 0)]
            assign[take] = stage
            left -= take.numel()
        b = u_pairs.shape[0]
        rank = trainer.global_rank if world > 1 else 0
        local = slice(rank * b, (rank + 1) * b)
        return assign.view_as(u_all)[local], routed.view_as(u_all)[local], audit.view_as(u_all)[local]

    async def _judge_stages(self, per_stage: list[list], seed: int) -> list[list]:
        """Every judge's items at once, on the judge loop; one list of judgements per judge."""
        judges = [self.judge, *self.stages]

        async def run(judge, items):
            return await judge_pairs(judge, items, self.order, seed) if items else []

        return list(await asyncio.gather(*(run(j, items) for j, items in zip(judges, per_stage, strict=True))))

    # --- reward hooks ------------------------------------------------------------------------------------------
    def on_pairwise_scores(self, trainer, module, ctx) -> None:
        now = time.perf_counter()
        if self._last_step_started is not None:
            self._step_seconds = now - self._last_step_started
        self._last_step_started = now
        with ctx.timer("routing"):
            b, k, _ = ctx.uncertainty.shape
            ii, jj = upper_pairs(k)
            self._control = {}
            assign, routed_mask, audit = self._route(trainer, module, ctx.scores[:, ii, jj].float(),
                                                     ctx.uncertainty[:, ii, jj].float())
            self.audit.observe_pool(ctx.scores[:, ii, jj], routed_mask)  # the pool of the audit's PPI estimates
            # (pair) -> (routed to the main judge, drawn for the audit, which judge)
            self._kinds = {(bi, int(ii[p]), int(jj[p])): (bool(routed_mask[bi, p]), bool(audit[bi, p]),
                                                          int(assign[bi, p]))
                           for bi, p in (assign >= 0).nonzero().tolist()}
            per_stage: list[list] = [[] for _ in range(1 + len(self.stages))]
            for (bi, i, j), (_, _, stage) in self._kinds.items():
                per_stage[stage].append((bi, i, j))
            routed = [key for keys in per_stage for key in keys]
            items = [[(_prompt_text(ctx.prompts[bi]), ctx.completions[bi][i], ctx.completions[bi][j])
                      for bi, i, j in keys] for keys in per_stage]
            self.pairs_seen += b * len(ii) * trainer.world_size  # global, like pairs_routed
            seed = self.seed + trainer.global_step * 1009 + trainer.global_rank
            future = submit(self._judge_stages(items, seed)) if routed else None
            self._pending = (future, routed, time.perf_counter())

    def on_before_rewards(self, trainer, module, ctx) -> None:
        if self._pending is None:
            return
        future, routed, started = self._pending
        self._pending = None
        error = None
        with ctx.timer("judge_wait"):
            try:
                judgements = [jd for stage in future.result() for jd in stage] if future is not None else []
            except Exception as err:  # a judge that raises (local model error, locked cache) costs the step nothing
                error, judgements = err, []
                log.warning("judge raised %s: %s; the %d routed pairs keep their PM scores",
                            type(err).__name__, err, len(routed))
        ctx.stats["judge_elapsed_s"] = time.perf_counter() - started
        failures = billed = requests = cached = 0
        spend = tokens = latency = 0.0
        self._stage_counts = [0] * (1 + len(self.stages))
        exported: list = []
        if error is not None:
            failures = len(routed)
            self.failures[f"error:{type(error).__name__}"] += len(routed)
        for (bi, i, j), jd in zip(routed, judgements, strict=error is None):
            billed += jd.billed
            requests += jd.requests
            cached += jd.cached
            spend += jd.cost_usd
            tokens += jd.tokens
            latency = max(latency, jd.latency_s)
            self.inconsistent += int(jd.inconsistent)
            if jd.score is None:
                failures += 1
                self.failures[jd.failure or "failed"] += 1
                continue
            routed_by_main, audited, stage = self._kinds[bi, i, j]
            if stage == 0:
                self.audit.add(routed_by_main, audited, pm_score=float(ctx.pm_scores[bi, i, j]), judge_score=jd.score)
            self._stage_counts[stage] += 1
            if stage == 0 and self.export_judged:
                exported.append(judged_record(ctx.prompts[bi], ctx.completions[bi][i], ctx.completions[bi][j], jd.score,
                                              f"step{trainer.global_step}-rank{trainer.global_rank}-{bi}-{i}-{j}",
                                              "rloo", str(self.judge.model)))
            value = float(verdict_logits(torch.tensor(jd.score), self.c))
            ctx.scores[bi, i, j] = value
            ctx.scores[bi, j, i] = -value
            ctx.judged[bi, i, j] = ctx.judged[bi, j, i] = True
        self._export([r for r in exported if r is not None], trainer)
        totals = torch.tensor([len(routed), failures, billed, requests, cached, spend, tokens, error is not None,
                               *self._stage_counts, *self.audit.step_counts()], dtype=torch.float64)
        if trainer.world_size > 1:  # every rank charges the same global amounts, so ledgers stay equal
            totals = trainer.strategy.reduce(totals.to(module.device), reduce_op="sum").cpu()
        n_routed, n_failed, n_billed, n_requests, n_cached, n_spend, n_tokens, n_errors, *rest = totals.tolist()
        stage_counts, audit = rest[: 1 + len(self.stages)], rest[1 + len(self.stages) :]
        self.audit.close_step(audit)
        self.pairs_routed += int(n_routed)
        self.ledger.charge(int(n_billed), n_spend, int(n_failed), int(n_cached))
        ctx.stats.update({
            "judge/routed_pairs": n_routed, "judge/failures": n_failed, "judge/billed": n_billed,
            "judge/requests": n_requests, "judge/cached": n_cached, "judge/tokens": n_tokens,
            "judge/cost_usd": n_spend, "judge/max_latency_s": latency,
            "judge/total_billed": float(self.ledger.calls), "judge/total_spend_usd": self.ledger.spend_usd,
            **self._control, **self.audit.metrics(),
            **({f"cascade/judged_by_{s}": c for s, c in enumerate(stage_counts)} if self.stages else {}),
        })
        # decided on the global count, so that every rank stops together
        self.consecutive_errors = self.consecutive_errors + 1 if n_errors else 0
        if self.max_consecutive_errors is not None and self.consecutive_errors > self.max_consecutive_errors:
            raise RuntimeError(f"the judge raised in {self.consecutive_errors} consecutive steps "
                               f"(max_consecutive_errors={self.max_consecutive_errors})") from error

    def _export(self, records: list[dict], trainer) -> None:
        if not self.export_judged or not records:
            return
        path = Path(self.export_judged)
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:  # appended per step: a killed run keeps what it paid for
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    # --- checkpointed state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "ledger": self.ledger.state_dict(),
            "pairs_seen": self.pairs_seen,
            "pairs_routed": self.pairs_routed,
            "inconsistent": self.inconsistent,
            "consecutive_errors": self.consecutive_errors,
            "failures": dict(self.failures),
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "audit": self.audit.state_dict(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.ledger.load_state_dict(state_dict["ledger"])
        self.pairs_seen = int(state_dict["pairs_seen"])
        self.pairs_routed = int(state_dict["pairs_routed"])
        self.inconsistent = int(state_dict["inconsistent"])
        self.consecutive_errors = int(state_dict.get("consecutive_errors", 0))
        self.failures = collections.Counter(state_dict["failures"])
        if self.controller is not None and state_dict.get("controller") is not None:
            self.controller.load_state_dict(state_dict["controller"])
        if "audit" in state_dict:
            self.audit.load_state_dict(state_dict["audit"])

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._pending is not None and self._pending[0] is not None:
            self._pending[0].cancel()  # a step that raised left its judge call behind
        self._pending = None
        if stage == "fit" and self.audit_fraction > 0:  # the run's answer to "did routing pay off?"
            L.pytorch.utilities.rank_zero_info(f"routing audit: {self.audit.verdict()}")
