"""What the caps leave for a batch of pairs, with the calls and spend of batches still in flight held back.

A batch's judge calls are paid when they return, which may be steps later (a reward pipeline, a reward server
with many clients). Charging the ledger only then would let every batch routed meanwhile see the whole remaining
budget. So each batch, when routed, holds what it may cost (:class:`Hold`): its planned calls, the re-asks it may
make after unusable answers, and their estimated price; the decision adds the holds of every batch in flight to
what the ledger has charged before it sizes the next batch (:class:`Allowance`), and a batch's hold is released
when its real cost is charged.

The price of a call is only known once calls have been answered: :class:`PriceBook` keeps, per judge, the highest
price of one billed call seen so far, so the spend held for calls in flight is an upper estimate rather than an
average (a spend cap may still be passed by a call dearer than any before it; docs/rloo.md says so). Before a
judge's first priced answer, its price is unknown, and under a spend cap only one batch at a time may call it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

NO_CAP = 2**62


@dataclass
class Hold:
    """What one batch in flight holds against the caps.

    Attributes:
        calls: Billed calls planned (pairs x calls per pair, every judge).
        reasks: Further calls its re-asks after unusable answers may make.
        usd: Estimated spend of both.
    """

    calls: int = 0
    reasks: int = 0
    usd: float = 0.0

    @property
    def total_calls(self) -> int:
        return self.calls + self.reasks

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state) -> Hold:
        """From :meth:`state_dict`, or a plain count of calls (checkpoints that held only calls)."""
        if isinstance(state, dict):
            return cls(int(state.get("calls", 0)), int(state.get("reasks", 0)), float(state.get("usd", 0.0)))
        return cls(calls=int(state or 0))


def reask_limit(judge) -> int:
    """Re-asks a judge makes per call after an unusable answer (its policy's ``unparseable_retries``; 0 for judges
    without a call policy). Wrappers (verdict cache, journal) are looked through."""
    seen = 0
    while getattr(judge, "policy", None) is None and getattr(judge, "backend", None) is not None and seen < 8:
        judge, seen = judge.backend, seen + 1
    return int(getattr(getattr(judge, "policy", None), "unparseable_retries", 0) or 0)


class PriceBook:
    """Per judge, the highest price of one billed call seen so far (``None``: none priced yet).

    Args:
        judges: How many judges (the main judge, then the cascade's stages).
    """

    def __init__(self, judges: int):
        self.max_usd: list[float | None] = [None] * judges

    def observe(self, judge: int, usd: float, calls: int) -> None:
        """``calls`` billed calls of ``judge`` that cost ``usd`` together (a pair's verdicts)."""
        if calls > 0:
            per_call = usd / calls
            current = self.max_usd[judge]
            self.max_usd[judge] = per_call if current is None else max(current, per_call)

    def estimate(self, judge: int) -> float | None:
        return self.max_usd[judge]

    def state_dict(self) -> list:
        return list(self.max_usd)

    def load_state_dict(self, state) -> None:
        for j, value in enumerate(list(state or [])[: len(self.max_usd)]):
            self.max_usd[j] = None if value is None else float(value)


class Allowance:
    """The calls and spend the caps leave for one batch, taken judge by judge as the batch is sized.

    Args:
        calls: Billed calls left (per-step cap, run cap less charged and held calls).
        usd: Spend left (``math.inf``: no spend cap).
        prices: Per judge, the price estimate of one call (``None``: unknown).
        calls_per_pair: 2 when each pair is asked in both display orders.
        busy: Some batch is in flight: a judge of unknown price then gets no calls under a spend cap.
    """

    def __init__(self, calls: float, usd: float, prices: list[float | None], calls_per_pair: int, busy: bool):
        self.calls, self.usd, self.prices = calls, usd, prices
        self.calls_per_pair, self.busy = calls_per_pair, busy

    def _calls_for(self, judge: int) -> float:
        """Calls ``judge`` may still make within both caps."""
        if math.isinf(self.usd):
            return self.calls
        price = self.prices[judge]
        if self.usd <= 0:
            return 0
        if price is None:  # not priced yet: one batch at a time finds out what a call costs
            return 0 if self.busy else self.calls
        if price == 0:
            return self.calls
        return min(self.calls, math.floor(self.usd / price + 1e-9))

    def pairs(self, judge: int) -> int:
        """Pairs ``judge`` may still be asked about."""
        return int(min(self._calls_for(judge), NO_CAP) // self.calls_per_pair)

    def take(self, judge: int, calls: int) -> float:
        """Takes ``calls`` billed calls of ``judge`` (negative: gives them back); returns their estimated price."""
        self.calls -= calls
        usd = calls * (self.prices[judge] or 0.0)
        self.usd -= usd
        return usd

    def reasks(self, judge: int, planned_calls: int, per_call: int) -> int:
        """Re-asks ``judge`` may make for ``planned_calls`` calls (``per_call`` each at most), within what is left."""
        return int(max(min(planned_calls * per_call, self._calls_for(judge), NO_CAP), 0))
