"""``BudgetLedger``: how many judge calls and how much money a run may still spend."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lit_route.checks import check_optional


class BudgetLedger:
    """Caps on billed judge calls per step, per run, and on spend; counters survive checkpoints via ``state_dict``.

    ``calls`` counts billed requests (answered with a completion), not pairs: a pair judged in both display orders
    is two calls, a cached verdict none. Failed pairs and cached verdicts are counted apart. ``by_judge`` splits
    calls and spend by judge (the main judge first, then each cascade stage), so that a resumed run can compare
    each judge's charges with its own spend record (:meth:`reconcile`).

    Args:
        max_calls_per_step: Most billed judge calls in one training step (``None``: no cap).
        max_calls_total: Most billed judge calls over the run.
        max_spend_usd: Most estimated spend over the run.
    """

    def __init__(self, max_calls_per_step: int | None = None, max_calls_total: int | None = None,
                 max_spend_usd: float | None = None):
        check_optional("max_calls_per_step", max_calls_per_step, integer=True)
        check_optional("max_calls_total", max_calls_total, integer=True)
        check_optional("max_spend_usd", max_spend_usd)
        self.max_calls_per_step = max_calls_per_step
        self.max_calls_total = max_calls_total
        self.max_spend_usd = max_spend_usd
        self.calls = 0
        self.spend_usd = 0.0
        self.failures = 0
        self.cached = 0
        # [calls, USD] per judge index; None: unknown (a state saved before the split was kept)
        self.by_judge: list[list] | None = []

    def allowance(self) -> int:
        """Calls this step may still make (``math.inf`` stands for no cap, returned as a large int)."""
        caps = [math.inf]
        if self.max_calls_per_step is not None:
            caps.append(self.max_calls_per_step)
        if self.max_calls_total is not None:
            caps.append(max(self.max_calls_total - self.calls, 0))
        if self.max_spend_usd is not None and self.spend_usd >= self.max_spend_usd:
            caps.append(0)
        cap = min(caps)
        return 2**62 if cap == math.inf else int(cap)

    def charge(self, calls: int, spend_usd: float = 0.0, failures: int = 0, cached: int = 0,
               by_judge: Sequence[tuple[int, float]] | None = None) -> None:
        """Records billed calls and spend, failed pairs, and cached verdicts (free, counted apart); ``by_judge``:
        the same calls and spend as ``(calls, USD)`` per judge index."""
        self.calls += calls
        self.spend_usd += spend_usd
        self.failures += failures
        self.cached += cached
        if by_judge is not None and self.by_judge is not None:
            self.by_judge.extend([0, 0.0] for _ in range(len(by_judge) - len(self.by_judge)))
            for row, (c, usd) in zip(self.by_judge, by_judge, strict=False):
                row[0] += int(c)
                row[1] += float(usd)

    def charged(self, judges: Sequence[int]) -> tuple[int, float] | None:
        """``(calls, USD)`` charged for the judges ``judges`` (indices); ``None`` when the ledger cannot tell."""
        if self.by_judge is None:
            return None
        rows = [self.by_judge[i] for i in judges if i < len(self.by_judge)]
        return sum(r[0] for r in rows), sum(r[1] for r in rows)

    def reconcile(self, calls: int, spend_usd: float, judges: Sequence[int] | None = None,
                  pending: tuple[int, float] = (0, 0.0)) -> int | None:
        """Raises the counters to what a verdict cache recorded as billed for this run (``calls``, ``spend_usd``)
        and returns the calls added. A run killed after paying for calls and before its next checkpoint resumes
        with a ledger that lacks them, while the cache serves their verdicts free: the record is the truth.

        Args:
            calls: Billed calls the record holds.
            spend_usd: Their spend.
            judges: The judges (indices) the record covers, compared with what was charged for them alone
                (``None``: every judge, compared with the totals).
            pending: Calls and spend of those judges already known and charged later (the paid-calls journal's,
                charged with their batches): not added twice.

        Returns:
            The calls added, or ``None`` when the ledger cannot tell what it charged ``judges`` (nothing added).
        """
        charged = (self.calls, self.spend_usd) if judges is None else self.charged(judges)
        if charged is None:
            return None
        added = max(int(calls) - charged[0] - int(pending[0]), 0)
        added_usd = max(float(spend_usd) - charged[1] - float(pending[1]), 0.0)
        split = None
        if judges:  # what was found missing is that judge's (the first of a group sharing one record)
            split = [(0, 0.0)] * judges[0] + [(added, added_usd)]
        self.charge(added, added_usd, by_judge=split)
        return added

    def state_dict(self) -> dict:
        return {"calls": self.calls, "spend_usd": self.spend_usd, "failures": self.failures, "cached": self.cached,
                "by_judge": self.by_judge}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self.spend_usd = float(state["spend_usd"])
        self.failures = int(state["failures"])
        self.cached = int(state.get("cached", 0))
        by_judge = state.get("by_judge")  # absent or None in a state saved before the split was kept
        self.by_judge = [[int(c), float(usd)] for c, usd in by_judge] if by_judge is not None else None
