"""``CachedJudge``: a content-addressed sqlite cache in front of any judge, so a rerun pays no call twice."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from lit_route.judges.base import JudgeStats
from lit_route.judges.prompt import PROMPT_VERSION
from lit_route.types import JudgeRequest, Preference, Verdict


class CachedJudge:
    """Caches successful verdicts by (backend identity, prompt version, prompt, a, b) — the order is in the key.

    The identity is every setting of the backend that changes its answer (``backend.identity()``: model, mode,
    server URL, temperature, token limits, thinking budget, ...), so a verdict is only ever served to a judge that
    would have given it. Backends without ``identity()`` are keyed by name and model.

    Failures are not cached: a rerun tries them again. The database uses WAL mode and a busy timeout, so several
    processes (DDP ranks, a rerun beside a running job) can share it; a verdict is written as soon as it arrives,
    so a killed run keeps everything it paid for.

    Args:
        backend: The judge to call on a miss.
        path: The sqlite file.
    """

    def __init__(self, backend, path: str = "judge_cache.sqlite"):
        self.backend = backend
        self.name, self.model = f"cached-{backend.name}", backend.model
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stats = JudgeStats()
        self._local = threading.local()
        self._identity = self.identity()
        with self._conn() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict TEXT NOT NULL)")

    def __repr__(self) -> str:
        return f"CachedJudge({self.backend!r}, path={str(self.path)!r})"

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

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        keys = [self.key(r) for r in requests]
        conn = self._conn()
        found: dict[str, Verdict] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            rows = conn.execute(f"SELECT key, verdict FROM verdicts WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            for key, blob in rows:
                found[key] = _decode(blob)
        misses = [i for i, k in enumerate(keys) if k not in found]
        # identical requests within one batch are paid once
        unique: dict[str, int] = {}
        for i in misses:
            unique.setdefault(keys[i], i)
        # one request per backend call, each stored the moment it returns: a killed run keeps what it paid for
        # (the backend's own limits still bound the concurrency)
        async def fetch(key: str, index: int) -> Verdict:
            (verdict,) = await self.backend.judge([requests[index]])
            self.stats.record(verdict)
            if verdict.ok:
                conn.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?)", (key, _encode(verdict)))
            return verdict

        fresh = await asyncio.gather(*(fetch(k, i) for k, i in unique.items()))
        self.stats.retries = self.backend.stats.retries  # retries happen inside the backend
        new = dict(zip(unique, fresh, strict=True))
        out = []
        for key in keys:
            if key in found:
                verdict = found[key]
                self.stats.record(verdict)
                out.append(verdict)
            else:
                out.append(new[key])
        return out


def _encode(verdict: Verdict) -> str:
    data = dataclasses.asdict(verdict)
    data["preference"] = verdict.preference.value if verdict.preference else None
    data.pop("extra", None)
    return json.dumps(data)


def _decode(blob: str) -> Verdict:
    data = json.loads(blob)
    data["preference"] = Preference(data["preference"]) if data["preference"] else None
    # a cached verdict is described as it was given, but nothing was sent or billed for it now
    data.update(cached=True, requests=0, billed=0)
    return Verdict(**{k: v for k, v in data.items() if k in _FIELDS})


_FIELDS = {f.name for f in dataclasses.fields(Verdict)}
