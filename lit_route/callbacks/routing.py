"""``UncertaintyRouting``: the callback that sends the PM's most uncertain pairs to a strong judge."""

from __future__ import annotations

import collections
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import lightning as L
import torch

from lit_route.judges.base import JudgeBackend
from lit_route.judges.cache import CachedJudge
from lit_route.judges.pairwise import judge_pairs, run_sync
from lit_route.rewards.pairwise import upper_pairs, verdict_logits
from lit_route.routing.budget import BudgetLedger
from lit_route.routing.routers import BudgetRouter, ThresholdRouter

log = logging.getLogger(__name__)


def _prompt_text(messages) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


class UncertaintyRouting(L.Callback):
    """Routes uncertain pairs of each RLOO group to a judge, within a budget, overlapped with the step.

    Per step: the routing decision is made on the (globally gathered) upper-triangle pairs of the group score
    matrices; the routed pairs are judged in a background thread while the module computes reference
    log-probabilities; a verdict replaces ``S_ij`` by ``±c`` (tie: 0) and ``S_ji`` by its negative; a failed
    call leaves the PM's score and is counted. The budget ledger and counters are saved in checkpoints.

    Args:
        judge: The judge backend (``class_path`` + ``init_args``).
        fraction: Share of each step's pairs to judge (top-k by ū); ignored when ``threshold`` is set.
        threshold: Judge every pair with ū above this instead.
        max_calls_per_step: Cap on pairs judged per step (all ranks together).
        max_calls_total: Cap on pairs judged over the run.
        max_spend_usd: Stop judging once the estimated spend reaches this.
        verdict_logit: c: the logit a verdict is worth (2 in the paper).
        order: Display order of the judge: ``random`` (default), ``both`` or ``fixed``.
        cache: sqlite verdict cache (``None``: no cache).
        seed: Seed of the display order.
    """

    def __init__(
        self,
        judge: JudgeBackend,
        fraction: float = 0.25,
        threshold: float | None = None,
        max_calls_per_step: int | None = None,
        max_calls_total: int | None = None,
        max_spend_usd: float | None = None,
        verdict_logit: float = 2.0,
        order: str = "random",
        cache: str | None = None,
        seed: int = 0,
    ):
        self.judge = CachedJudge(judge, cache) if cache else judge
        self.router = ThresholdRouter(threshold) if threshold is not None else BudgetRouter(fraction)
        self.ledger = BudgetLedger(max_calls_per_step, max_calls_total, max_spend_usd)
        self.c, self.order, self.seed = verdict_logit, order, seed
        self.pairs_seen = 0
        self.pairs_routed = 0
        self.inconsistent = 0
        self.failures: collections.Counter = collections.Counter()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[Future, list, float] | None = None

    # --- routing decision -------------------------------------------------------------------------------------
    def _route(self, trainer, u_pairs: torch.Tensor) -> torch.Tensor:
        """u_pairs: (B, P) local upper-triangle uncertainties -> local (B, P) mask, decided on the global batch."""
        world = trainer.world_size
        global_u = trainer.strategy.all_gather(u_pairs).reshape(-1, u_pairs.shape[-1]) if world > 1 else u_pairs
        mask = self.router.route(torch.zeros_like(global_u), global_u)
        allowance = self.ledger.allowance()
        if int(mask.sum()) > allowance:  # keep the most uncertain within the budget
            scores = torch.where(mask, global_u, torch.full_like(global_u, -torch.inf))
            top = torch.argsort(scores.flatten(), descending=True, stable=True)[:allowance]
            mask = torch.zeros_like(mask).flatten().index_fill_(0, top, True).view_as(mask)
        b = u_pairs.shape[0]
        rank = trainer.global_rank if world > 1 else 0
        return mask[rank * b : (rank + 1) * b]

    # --- reward hooks ------------------------------------------------------------------------------------------
    def on_pairwise_scores(self, trainer, module, ctx) -> None:
        with ctx.timer("routing"):
            b, k, _ = ctx.uncertainty.shape
            ii, jj = upper_pairs(k)
            u_pairs = ctx.uncertainty[:, ii, jj].float()
            mask = self._route(trainer, u_pairs)
            routed = [(bi, int(ii[p]), int(jj[p])) for bi, p in mask.nonzero().tolist()]
            items = [(_prompt_text(ctx.prompts[bi]), ctx.completions[bi][i], ctx.completions[bi][j]) for bi, i, j in routed]
            self.pairs_seen += b * len(ii) * trainer.world_size  # global, like pairs_routed
            seed = self.seed + trainer.global_step * 1009 + trainer.global_rank
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")
            future = self._executor.submit(run_sync, judge_pairs(self.judge, items, self.order, seed)) if items else None
            self._pending = (future, routed, time.perf_counter())

    def on_before_rewards(self, trainer, module, ctx) -> None:
        if self._pending is None:
            return
        future, routed, started = self._pending
        self._pending = None
        with ctx.timer("judge_wait"):
            judgements = future.result() if future is not None else []
        ctx.stats["judge_elapsed_s"] = time.perf_counter() - started
        failures = 0
        calls = spend = tokens = latency = 0.0
        for (bi, i, j), jd in zip(routed, judgements, strict=True):
            calls += jd.paid_calls
            spend += jd.cost_usd
            tokens += jd.tokens
            latency = max(latency, jd.latency_s)
            self.inconsistent += int(jd.inconsistent)
            if jd.score is None:
                failures += 1
                self.failures[jd.failure or "failed"] += 1
                continue
            value = float(verdict_logits(torch.tensor(jd.score), self.c))
            ctx.scores[bi, i, j] = value
            ctx.scores[bi, j, i] = -value
            ctx.judged[bi, i, j] = ctx.judged[bi, j, i] = True
        totals = torch.tensor([len(routed), failures, calls, spend, tokens], dtype=torch.float64)
        if trainer.world_size > 1:  # every rank charges the same global amounts, so ledgers stay equal
            totals = trainer.strategy.reduce(totals.to(module.device), reduce_op="sum").cpu()
        n_routed, n_failed, n_calls, n_spend, n_tokens = totals.tolist()
        self.pairs_routed += int(n_routed)
        self.ledger.charge(int(n_routed), n_spend, int(n_failed))
        ctx.stats.update({
            "judge/routed_pairs": n_routed, "judge/failures": n_failed, "judge/paid_calls": n_calls,
            "judge/tokens": n_tokens, "judge/cost_usd": n_spend, "judge/max_latency_s": latency,
            "judge/total_calls": float(self.ledger.calls), "judge/total_spend_usd": self.ledger.spend_usd,
        })

    # --- checkpointed state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "ledger": self.ledger.state_dict(),
            "pairs_seen": self.pairs_seen,
            "pairs_routed": self.pairs_routed,
            "inconsistent": self.inconsistent,
            "failures": dict(self.failures),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.ledger.load_state_dict(state_dict["ledger"])
        self.pairs_seen = int(state_dict["pairs_seen"])
        self.pairs_routed = int(state_dict["pairs_routed"])
        self.inconsistent = int(state_dict["inconsistent"])
        self.failures = collections.Counter(state_dict["failures"])

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
