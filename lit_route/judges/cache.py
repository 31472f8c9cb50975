"""``CachedJudge``: a content-addressed sqlite cache in front of any judge, so no verdict is paid for twice.

Not twice on a rerun (the verdict is stored), not twice within a run (one call per key in flight), not twice
by two processes sharing the file (a claim with a lease: the second waits for the first's answer), and what was
paid is recorded with the verdict, so a resumed run's budget sees it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from lit_route.checks import check_choice, check_nonnegative
from lit_route.judges.base import JudgeBackend, JudgeStats
from lit_route.judges.prompt import PROMPT_VERSION, final_line
from lit_route.types import JudgeRequest, Preference, Verdict

STORE_TEXT = ("final", "full")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict TEXT NOT NULL)",
    # a request being paid for now: other processes wait for its answer until the lease runs out
    "CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL)",
    # every billed call, written in the transaction that stores its verdict: the run's true spend
    "CREATE TABLE IF NOT EXISTS spend (run TEXT NOT NULL, key TEXT NOT NULL, requests INTEGER NOT NULL, "
    "billed INTEGER NOT NULL, cost_usd REAL NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, "
    "at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS spend_by_run ON spend (run)",
)


class CachedJudge:
    """Caches successful verdicts by (backend identity, prompt version, prompt, a, b) — the order is in the key.

    The identity is every setting of the backend that changes its answer (``backend.identity()``: model, mode,
    server URL, temperature, token limits, thinking budget, prompt format, ...), so a verdict is only ever served
    to a judge that would have given it. Backends without ``identity()`` are keyed by name and model.

    Each request is paid for at most once:

    - in this process, one call per key is in flight; a second request for it (the same pair twice in a run, a
      caller sending requests one by one) waits for that call's verdict, free;
    - across processes sharing the file, the caller claims the key with a lease of ``lease_s`` seconds, renewed
      while its call runs; another process finds the claim and waits for the verdict (polling), or takes the
      claim over when the lease ran out (its owner was killed) or was released without a verdict (a failure).

    Failures are not cached: a rerun tries them again. Every billed call is recorded (``spend`` table) in the
    transaction that stores its verdict, under ``run_id``, so a run killed after paying and resumed from an older
    checkpoint can be charged what it paid (:meth:`spent`). The database uses WAL mode and a busy timeout.

    Args:
        backend: The judge to call on a miss.
        path: The sqlite file.
        store_text: ``final``: keep the answer's final line and a SHA-256 of the whole answer (small rows whatever
            the judge writes); ``full``: keep the whole answer.
        lease_s: How long a claim holds without renewal; a killed process's claims are taken over after this.
        run_id: Key of this run's spend records (default: a fresh id).
    """

    def __init__(self, backend: JudgeBackend, path: str = "judge_cache.sqlite", store_text: str = "final",
                 lease_s: float = 30.0, run_id: str | None = None):
        check_choice("store_text", store_text, STORE_TEXT)
        check_nonnegative("lease_s", lease_s, positive=True)
        self.backend = backend
        self.name, self.model = f"cached-{backend.name}", backend.model
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"cache: {self.path} is a folder; give a file path such as {self.path / 'cache.sqlite'}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.store_text, self.lease_s = store_text, lease_s
        self.run_id = run_id or uuid.uuid4().hex
        self.stats = JudgeStats()
        self._local = threading.local()
        self._inflight: dict[str, asyncio.Future] = {}
        self._nonce = uuid.uuid4().hex[:12]
        self._identity = self.identity()
        conn = self._conn()
        for statement in _SCHEMA:
            conn.execute(statement)

    def __repr__(self) -> str:
        return f"CachedJudge({self.backend!r}, path={str(self.path)!r})"

    def __getstate__(self) -> dict:
        # spawned processes get a copy: connections and in-flight calls are per process
        state = dict(self.__dict__)
        state.pop("_local"), state.pop("_inflight")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local, self._inflight = threading.local(), {}

    @property
    def _owner(self) -> str:
        return f"{os.getpid()}:{self._nonce}"  # a forked rank shares the nonce, not the pid

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def identity(self) -> dict:
        identity = getattr(self.backend, "identity", None)
        return identity() if callable(identity) else {"backend": self.backend.name, "model": self.backend.model}

    def key(self, request: JudgeRequest) -> str:
        blob = json.dumps(
            [self._identity, PROMPT_VERSION, request.prompt, request.response_a, request.response_b],
            ensure_ascii=False, sort_keys=True, default=str,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def spent(self, run_id: str | None = None) -> tuple[int, float]:
        """``(billed calls, USD)`` recorded under ``run_id`` (default: this judge's), by every process."""
        row = self._conn().execute("SELECT COALESCE(SUM(billed), 0), COALESCE(SUM(cost_usd), 0.0) FROM spend "
                                   "WHERE run = ?", (run_id or self.run_id,)).fetchone()
        return int(row[0]), float(row[1])

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        keys = [self.key(r) for r in requests]
        conn = self._conn()
        found: dict[str, Verdict] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            rows = conn.execute(f"SELECT key, verdict FROM verdicts WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            for key, blob in rows:
                found[key] = _decode(blob)
        unique: dict[str, int] = {}  # identical requests within one batch are paid once
        for i, key in enumerate(keys):
            if key not in found:
                unique.setdefault(key, i)
        # one request per backend call, each stored the moment it returns: a killed run keeps what it paid for
        # (the backend's own limits still bound the concurrency)
        fresh = await asyncio.gather(*(self._once(k, requests[i]) for k, i in unique.items()))
        self.stats.retries = self.backend.stats.retries  # retries happen inside the backend
        new = dict(zip(unique, fresh, strict=True))
        out = []
        for i, key in enumerate(keys):
            verdict = found[key] if key in found else new[key] if unique[key] == i else shared_copy(new[key])
            self.stats.record(verdict)
            out.append(verdict)
        return out

    async def _once(self, key: str, request: JudgeRequest) -> Verdict:
        """The verdict of ``key``, from the call already in flight in this process if there is one."""
        loop = asyncio.get_running_loop()
        running = self._inflight.get(key)
        if running is not None and running.get_loop() is loop:
            return shared_copy(await asyncio.shield(running))
        future = loop.create_future()
        self._inflight[key] = future
        try:
            verdict = await self._claimed_call(key, request)
        except BaseException as err:
            if isinstance(err, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(err)
                future.exception()  # retrieved: waiters re-raise it, none is not an error
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(verdict)
        return verdict

    async def _claimed_call(self, key: str, request: JudgeRequest) -> Verdict:
        """Claims ``key`` across processes (or waits for the claim's verdict), then calls and stores."""
        wait = 0.02
        while True:
            hit = self._claim(key)
            if hit is True:
                break
            if isinstance(hit, Verdict):
                return hit
            await asyncio.sleep(wait)  # another process is paying for it: its verdict will be in the file
            wait = min(wait * 2, 0.5)
        renew = asyncio.get_running_loop().create_task(self._renew(key))
        try:
            (verdict,) = await self.backend.judge([request])
        except BaseException:
            self._transaction(lambda c: c.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, self._owner)))
            raise
        finally:
            renew.cancel()
        self._store(key, verdict)
        return verdict

    def _claim(self, key: str) -> Verdict | bool:
        """The stored verdict, ``True`` when the claim is ours now, ``False`` when another live process holds it."""

        def claim(conn):
            row = conn.execute("SELECT verdict FROM verdicts WHERE key = ?", (key,)).fetchone()
            if row is not None:
                return _decode(row[0])
            held = conn.execute("SELECT owner, expires FROM claims WHERE key = ?", (key,)).fetchone()
            now = time.time()
            if held is not None and held[0] != self._owner and held[1] > now:
                return False
            conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (key, self._owner, now + self.lease_s))
            return True

        return self._transaction(claim)

    async def _renew(self, key: str) -> None:
        while True:  # a call with long retries keeps its claim; a killed process stops renewing
            await asyncio.sleep(self.lease_s / 3)
            self._transaction(lambda c: c.execute("UPDATE claims SET expires = ? WHERE key = ? AND owner = ?",
                                                  (time.time() + self.lease_s, key, self._owner)))

    def _store(self, key: str, verdict: Verdict) -> None:
        """The verdict (if usable), what it cost, and the end of the claim: one transaction."""

        def store(conn):
            if verdict.ok:
                conn.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?)", (key, _encode(verdict, self.store_text)))
            if verdict.requests or verdict.billed:
                conn.execute("INSERT INTO spend VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (self.run_id, key, verdict.requests, verdict.billed, verdict.cost_usd,
                              verdict.input_tokens, verdict.output_tokens, time.time()))
            conn.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, self._owner))

        self._transaction(store)

    def _transaction(self, body):
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")  # the write lock first: a read-then-write cannot interleave
        try:
            result = body(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result


def spent_by_judge(judges, run_id: str) -> list[tuple[list[int], int, float]]:
    """What each verdict cache among ``judges`` recorded as billed under ``run_id``: ``(indices of the judges
    behind that file, billed calls, USD)`` per file (judges sharing one file share one record). Judges without a
    cache keep no record and are in none."""
    groups: dict[Path, list[int]] = {}
    for index, judge in enumerate(judges):
        if isinstance(judge, CachedJudge):
            groups.setdefault(judge.path.resolve(), []).append(index)
    return [(indices, *judges[indices[0]].spent(run_id)) for indices in groups.values()]


def shared_copy(verdict: Verdict) -> Verdict:
    """A copy for a second asker of a verdict paid for once: nothing was sent or billed for it."""
    if verdict.ok:
        return dataclasses.replace(verdict, cached=True, requests=0, billed=0)
    return dataclasses.replace(verdict, requests=0, billed=0, cost_usd=0.0, input_tokens=0, output_tokens=0)


def _encode(verdict: Verdict, store_text: str = "full") -> str:
    data = dataclasses.asdict(verdict)
    data["preference"] = verdict.preference.value if verdict.preference else None
    data.pop("extra", None)
    if store_text == "final":  # the line the verdict was read from, and a fingerprint of the rest
        data["raw"] = final_line(verdict.raw)[:500]
        data["raw_sha256"] = hashlib.sha256(verdict.raw.encode("utf-8")).hexdigest()
    return json.dumps(data)


def _decode(blob: str) -> Verdict:
    data = json.loads(blob)
    data["preference"] = Preference(data["preference"]) if data["preference"] else None
    # a cached verdict is described as it was given, but nothing was sent or billed for it now
    data.update(cached=True, requests=0, billed=0)
    return Verdict(**{k: v for k, v in data.items() if k in _FIELDS})


_FIELDS = {f.name for f in dataclasses.fields(Verdict)}
