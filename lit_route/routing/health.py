"""``JudgeHealth``: a judge that keeps failing is reported and stops the run, on every path that routes.

A judge may fail two ways that no retry mends: it raises (a local model error, a locked cache), or every pair
routed to it fails for a lasting reason: the provider refused the request (a rejected key, an unknown model:
``client_error``) or could not be reached (``connection``). Either way the routed pairs keep the PM's scores, so a
run would silently train on PM rewards alone. Counted per batch (the routing callback: per step, on the totals
summed over ranks, so every rank decides alike), more than ``limit`` such batches in a row raise
:class:`JudgeFailing`; :meth:`JudgeHealth.status` says how things stand (``lit-route serve``'s ``/health``).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

LASTING_FAILURES = ("client_error", "connection")
"""Failure reasons no retry mends."""


class JudgeFailing(RuntimeError):
    """The judge raised, or failed every routed pair for a lasting reason, in more consecutive batches than
    ``max_consecutive_errors`` allows."""


class JudgeHealth:
    """Counts the batches in a row in which the judge failed (see the module docstring).

    Args:
        limit: Failing batches in a row allowed before :meth:`record` returns the error to raise (``None``: never).
        unit: What a batch is called in messages (``batches``, ``steps``).
    """

    def __init__(self, limit: int | None = 3, unit: str = "batches"):
        self.limit, self.unit = limit, unit
        self.consecutive = 0
        self.reason: str | None = None  # why the judge failed in the latest failing batch

    def record(self, routed: int, lasting: int, error: BaseException | None = None,
               reason: str | None = None) -> JudgeFailing | None:
        """One batch: ``routed`` pairs sent to the judges, ``lasting`` of them failed for a lasting reason, and the
        exception a judge raised (if one did); ``reason`` the judge client's own words. Returns the error to raise
        once more than ``limit`` batches in a row failed. A batch that routed nothing leaves the count."""
        if not routed and error is None:
            return None
        if error is not None:
            reason = f"{type(error).__name__}: {error}"
        elif not lasting or lasting < routed:
            self.consecutive, self.reason = 0, None
            return None
        self.consecutive += 1
        self.reason = " ".join((reason or "failed").split())[:300]  # one line: an SDK's message can span several
        if self.limit is None or self.consecutive <= self.limit:
            return None
        message = (f"the judge {'raised' if error is not None else 'failed every routed pair'} in "
                   f"{self.consecutive} consecutive {self.unit} (max_consecutive_errors={self.limit}): {self.reason}")
        if self.consecutive == self.limit + 1:
            log.error("%s", message)
        failing = JudgeFailing(message)
        failing.__cause__ = error
        return failing

    def status(self) -> dict:
        """``{"status": "ok"}``, or ``degraded`` (failing, up to ``limit`` batches in a row) or ``failing``
        (more), with the ``reason`` and the count of ``failed_batches``."""
        if not self.consecutive:
            return {"status": "ok"}
        failing = self.limit is not None and self.consecutive > self.limit
        return {"status": "failing" if failing else "degraded", "reason": self.reason,
                "failed_batches": self.consecutive}

    def state_dict(self) -> dict:
        return {"consecutive_errors": self.consecutive, "judge_failure": self.reason}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state.get("consecutive_errors", 0))
        self.reason = state.get("judge_failure")


def failure_text(answers) -> str:
    """What the judge's client said about the first failed pair of a batch (``answers``: per judge, the pair
    judgements; the SDK's error: ``client_error: Error code: 401 - ...``), or its failure reason."""
    for per_judge in answers:
        for jd in per_judge:
            if jd.score is None:
                return next((v.raw for v in reversed(jd.verdicts) if v.raw), None) or jd.failure or "failed"
    return "failed"
