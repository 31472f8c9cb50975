"""``PaidJournal``: each judge request of a run written down before it is sent and again when it returns.

The budget ledger is charged when a batch's verdicts are merged, and saved with the checkpoint (or a server's
state file). A process killed with calls in flight leaves billed calls the ledger never saw:

- calls that returned after the checkpoint: the verdict cache then serves them free to the resumed run;
- calls the provider received whose answers the process never read: billed, and asked again after the restart.

The journal holds both. Before a request leaves, a ``sent`` line is appended and flushed (write-ahead); when it
returns, a line with what it was billed. A resumed run charges a batch with everything the journal holds for it,
by the killed process and by itself, and each request sent and never answered as one billed call at an estimated
price (the judge's price for the token estimate its rate limiter uses: the real tokens were never read). The
ledger's calls then equal the provider's, and its spend differs from the bill only by those estimates.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from lit_route.judges.cache import CachedJudge, spent_by_judge
from lit_route.judges.remote import CALL_LOG
from lit_route.routing.budget import BudgetLedger
from lit_route.types import JudgeRequest, Verdict

log = logging.getLogger(__name__)


class PaidJournal:
    """An append-only file of JSON lines, and their sums per batch and judge.

    Lines (``key``: the batch, ``judge``: its index, 0 the main judge, s the cascade's stage s):

    - ``{"key", "judge", "call", "sent": usd}``: a request about to be sent, at its estimated price;
    - ``{"key", "judge", "call", "billed": n, "cost": usd}``: that request returned (``billed`` 0: a failure);
    - ``{"key", "judge", "billed": n, "cost": usd}``: a judge that writes no ``sent`` lines (a local model, a
      function), once its verdict returns.

    Args:
        path: The file (one per process: under DDP each rank has its own).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._paid: dict[int, dict[int, list]] = {}  # batch -> judge -> [billed calls, USD]
        self.lost = 0  # requests an earlier process sent and never read the answer of (see load)
        self.lost_by_key: dict[int, int] = {}  # those requests by batch
        self.found = False  # whether load found an earlier process's journal

    def load(self, owed: Callable[[int], bool]) -> int:
        """Adds the lines of batches not yet charged (``owed(key)``) from an earlier process; returns their calls.

        A request with a ``sent`` line and no answer was delivered, or about to be, when that process stopped: it
        is counted as one billed call at its estimated price (logged, with how many there were)."""
        self.found = self.path.exists()
        if not self.found:
            return 0
        sent: dict[str, tuple[int, int, float]] = {}
        answered: set[str] = set()
        total = 0
        with self._lock, open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                    key, judge = int(row["key"]), int(row.get("judge", 0))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a line cut by the kill: a "sent" was never sent, an answer counts as lost below
                if not owed(key):
                    continue
                if "sent" in row:
                    sent[row["call"]] = (key, judge, float(row["sent"]))
                    continue
                if row.get("call") is not None:
                    answered.add(row["call"])
                self._add(key, judge, int(row["billed"]), float(row["cost"]))
                total += int(row["billed"])
            lost = [v for call, v in sent.items() if call not in answered]
            for key, judge, usd in lost:
                self._add(key, judge, 1, usd)
        self.lost = len(lost)
        for key, _, _ in lost:
            self.lost_by_key[key] = self.lost_by_key.get(key, 0) + 1
        if lost:
            log.warning("%s: %d judge requests were in flight when an earlier process stopped (the provider bills "
                        "them; their answers are lost): charged as billed calls at an estimated $%.6f, and asked "
                        "again", self.path, len(lost), sum(usd for _, _, usd in lost))
        return total + len(lost)

    def _add(self, key: int, judge: int, billed: int, cost_usd: float) -> None:
        row = self._paid.setdefault(key, {}).setdefault(judge, [0, 0.0])
        row[0] += billed
        row[1] += cost_usd

    def _write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:  # closed at once: on disk for the next process
            fh.write(json.dumps(row) + "\n")

    def sent(self, key: int, judge: int, estimate_usd: float) -> str:
        """Writes down a request about to be sent; returns its call id."""
        call = uuid.uuid4().hex[:16]
        with self._lock:
            self._write({"key": key, "judge": judge, "call": call, "sent": estimate_usd})
        return call

    def answered(self, key: int, judge: int, call: str, billed: int, cost_usd: float) -> None:
        """Writes down that request ``call`` returned, billed ``billed`` calls for ``cost_usd``."""
        with self._lock:
            self._write({"key": key, "judge": judge, "call": call, "billed": billed, "cost": cost_usd})
            self._add(key, judge, billed, cost_usd)

    def record(self, key: int, billed: int, cost_usd: float, judge: int = 0) -> None:
        """Writes down what a verdict of a judge that writes no ``sent`` lines was billed."""
        with self._lock:
            self._write({"key": key, "judge": judge, "billed": billed, "cost": cost_usd})
            self._add(key, judge, billed, cost_usd)

    def take(self, key: int) -> list[tuple[int, float]]:
        """Billed calls and spend of batch ``key`` so far, ``(calls, USD)`` per judge index, forgotten here (the
        caller charges them)."""
        with self._lock:
            by_judge = self._paid.pop(key, {})
        return [(int(by_judge[j][0]), float(by_judge[j][1])) if j in by_judge else (0, 0.0)
                for j in range(max(by_judge, default=-1) + 1)]

    def pending(self, judges: int) -> list[tuple[int, float]]:
        """``(calls, USD)`` per judge index (``judges`` of them) held for batches not yet charged."""
        out = [[0, 0.0] for _ in range(judges)]
        with self._lock:
            for by_judge in self._paid.values():
                for j, (billed, cost) in by_judge.items():
                    if j < judges:
                        out[j][0] += billed
                        out[j][1] += cost
        return [(int(c), float(usd)) for c, usd in out]

    def meter(self, judge, key: int, index: int = 0) -> MeteredJudge:
        """``judge`` (the judge of index ``index``) writing its requests of batch ``key`` here."""
        return MeteredJudge(judge, self, key, index)


class MeteredJudge:
    """``judge`` with each request sent on its own, and written down: each call before it is sent and when it
    returns (a remote judge, through :data:`~lit_route.judges.remote.CALL_LOG`), or the verdict's billing once it
    returns (any other judge)."""

    def __init__(self, judge, journal: PaidJournal, key: int, index: int = 0):
        self.backend, self.journal, self.key, self.index = judge, journal, key, index
        self.name, self.model = judge.name, judge.model
        self.stats = judge.stats

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        async def one(request: JudgeRequest) -> Verdict:
            calls = _CallLog(self.journal, self.key, self.index)
            CALL_LOG.set(calls)  # this request's task: the backend's tasks below inherit it
            (verdict,) = await self.backend.judge([request])
            if verdict.billed and not calls.used:
                self.journal.record(self.key, verdict.billed, 0.0 if verdict.cached else verdict.cost_usd,
                                    self.index)
            return verdict

        return list(await asyncio.gather(*(one(r) for r in requests)))


class _CallLog:
    """The :data:`~lit_route.judges.remote.CALL_LOG` of one request: its calls as journal lines."""

    def __init__(self, journal: PaidJournal, key: int, index: int):
        self.journal, self.key, self.index = journal, key, index
        self.used = False

    def sent(self, estimate_usd: float) -> str:
        self.used = True
        return self.journal.sent(self.key, self.index, estimate_usd)

    def answered(self, call: str, billed: int, cost_usd: float) -> None:
        self.journal.answered(self.key, self.index, call, billed, cost_usd)


def reconcile_with_caches(ledger: BudgetLedger, judges: Sequence, run_id: str,
                          pending: Sequence[tuple[int, float]] | None = None) -> int:
    """Raises ``ledger``, judge by judge, to what each judge's verdict cache recorded as billed under ``run_id``
    (calls a killed process paid after the checkpoint the run resumed from), and logs what was added and what could
    not be checked. Returns the calls added.

    Args:
        ledger: The resumed run's ledger.
        judges: The routing's judges (main first, then the cascade's stages).
        run_id: The run's id (its spend records' key).
        pending: ``(calls, USD)`` per judge that the run's journal holds for batches not yet charged (charged with
            them, so not added here); ``None``: the run keeps no journal.
    """
    names = ["judge", *(f"cascade[{s}]" for s in range(len(judges) - 1))]
    journaled = pending is not None
    pending = list(pending) if journaled else [(0, 0.0)] * len(judges)
    groups = spent_by_judge(judges, run_id)
    if ledger.by_judge is None and not (len(groups) == 1 and len(groups[0][0]) == len(judges)):
        # a state saved before the ledger split its charges by judge: every record against the totals, which
        # never charges twice but misses what a judge with a cache paid while the others were charged
        groups = [(list(range(len(judges))), sum(g[1] for g in groups), sum(g[2] for g in groups))] if groups else []
        if groups:
            log.warning("the checkpoint's budget ledger does not split its charges by judge: the verdict caches' "
                        "spend records were checked against its totals, which can miss calls paid after it")
    added = 0
    for indices, calls, usd in groups:
        mine = (sum(pending[i][0] for i in indices), sum(pending[i][1] for i in indices))
        n = ledger.reconcile(calls, usd, judges=None if ledger.by_judge is None else indices, pending=mine) or 0
        if n:
            log.warning("%s: %d judge calls billed after the checkpoint were found in the verdict cache's spend "
                        "record and are charged", "+".join(names[i] for i in indices), n)
        added += n
    uncached = [names[i] for i, judge in enumerate(judges) if not isinstance(judge, CachedJudge)]
    if uncached and journaled:
        log.info("%s: no verdict cache, no spend record to check: calls billed after the checkpoint are charged "
                 "from the run's journal alone", ", ".join(uncached))
    elif uncached:
        log.warning("%s: no verdict cache and no journal of the earlier process: calls billed after the checkpoint, "
                    "if any, cannot be charged", ", ".join(uncached))
    return added
