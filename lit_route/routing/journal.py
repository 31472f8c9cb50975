"""``PaidJournal``: what this run's judge calls were billed, per batch, written as each call returns.

The budget ledger is charged when a batch's verdicts are merged, and saved with the checkpoint. Calls that return
after that checkpoint and before a crash are billed by the provider, and the verdict cache then serves them free
to the resumed run: a ledger charged from the verdicts alone would never see them. The journal records each billed
call under its batch number the moment it returns (one line, appended and flushed), so a resumed run charges a
batch with everything ever paid for it, by the killed process and by itself: the ledger stays equal to the
provider's billing.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from lit_route.types import JudgeRequest, Verdict


class PaidJournal:
    """An append-only file of ``{"key": batch, "billed": n, "cost": usd}`` lines, and their sums per batch.

    Args:
        path: The file (one per process: under DDP each rank has its own).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._paid: dict[int, list[float]] = collections.defaultdict(lambda: [0, 0.0])

    def load(self, owed: Callable[[int], bool]) -> int:
        """Adds the lines of batches not yet charged (``owed(key)``) from an earlier process; returns their calls."""
        if not self.path.exists():
            return 0
        total = 0
        with self._lock, open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the crash: its call is in the cache, not billed twice
                    continue
                if owed(int(row["key"])):
                    self._paid[int(row["key"])][0] += int(row["billed"])
                    self._paid[int(row["key"])][1] += float(row["cost"])
                    total += int(row["billed"])
        return total

    def record(self, key: int, billed: int, cost_usd: float) -> None:
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"key": key, "billed": billed, "cost": cost_usd}) + "\n")
            self._paid[key][0] += billed
            self._paid[key][1] += cost_usd

    def take(self, key: int) -> tuple[int, float]:
        """Billed calls and spend of batch ``key`` so far, forgotten here (the caller charges them)."""
        with self._lock:
            billed, cost = self._paid.pop(key, (0, 0.0))
        return int(billed), float(cost)

    def meter(self, judge, key: int) -> MeteredJudge:
        return MeteredJudge(judge, self, key)


class MeteredJudge:
    """``judge`` with each request sent on its own and its billing journaled the moment it returns."""

    def __init__(self, judge, journal: PaidJournal, key: int):
        self.backend, self.journal, self.key = judge, journal, key
        self.name, self.model = judge.name, judge.model
        self.stats = judge.stats

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        async def one(request: JudgeRequest) -> Verdict:
            (verdict,) = await self.backend.judge([request])
            if verdict.billed:
                self.journal.record(self.key, verdict.billed, 0.0 if verdict.cached else verdict.cost_usd)
            return verdict

        return list(await asyncio.gather(*(one(r) for r in requests)))
