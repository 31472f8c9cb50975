"""``BudgetLedger``: how many judge calls and how much money a run may still spend."""

from __future__ import annotations

import math

from lit_route.checks import check_optional


class BudgetLedger:
    """Caps on billed judge calls per step, per run, and on spend; counters survive checkpoints via ``state_dict``.

    ``calls`` counts billed requests (answered with a completion), not pairs: a pair judged in both display orders
    is two calls, a cached verdict none. Failed pairs and cached verdicts are counted apart.

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

    def charge(self, calls: int, spend_usd: float = 0.0, failures: int = 0, cached: int = 0) -> None:
        """Records billed calls and spend, failed pairs, and cached verdicts (free, counted apart)."""
        self.calls += calls
        self.spend_usd += spend_usd
        self.failures += failures
        self.cached += cached

    def reconcile(self, calls: int, spend_usd: float) -> int:
        """Raises the counters to what the verdict cache recorded as billed for this run (``calls``, ``spend_usd``)
        and returns the calls added. A run killed after paying for calls and before its next checkpoint resumes
        with a ledger that lacks them, while the cache serves their verdicts free: the record is the truth."""
        added = max(int(calls) - self.calls, 0)
        self.calls += added
        self.spend_usd = max(self.spend_usd, float(spend_usd))
        return added

    def state_dict(self) -> dict:
        return {"calls": self.calls, "spend_usd": self.spend_usd, "failures": self.failures, "cached": self.cached}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self.spend_usd = float(state["spend_usd"])
        self.failures = int(state["failures"])
        self.cached = int(state.get("cached", 0))
