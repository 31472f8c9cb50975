"""Call policy of remote judges: concurrency, requests/tokens per minute, retries that honour ``Retry-After``.

Retries use tenacity and the rate limits aiolimiter; the SDKs' own retries are switched off so that one policy
decides, and every retry is counted.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from lit_route.checks import check_nonnegative, check_optional


@dataclass
class CallPolicy:
    """How a remote judge may call its server.

    Args:
        max_concurrency: Calls in flight at once.
        requests_per_minute: Request rate cap (``None``: none).
        tokens_per_minute: Token rate cap, charged with an estimate of each call's tokens (``None``: none).
        max_attempts: Attempts per call for retryable failures (429, 529, 5xx, timeouts, connection errors).
        timeout_s: Timeout of one attempt.
        deadline_s: Time limit of a call including all its retries.
        backoff_base_s: First backoff; doubles per attempt, with full jitter, when no ``Retry-After`` is given.
        backoff_max_s: Longest single wait (also caps ``Retry-After``).
        unparseable_retries: New calls made when an answer has no verdict tag, before it counts as a failure
            (fewer when a per-step call cap has no room left: see :data:`REASK_ALLOWANCE`).
        price_input_per_mtok: USD per million input tokens (cost estimate).
        price_output_per_mtok: USD per million output tokens.
    """

    max_concurrency: int = 8
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_attempts: int = 6
    timeout_s: float = 120.0
    deadline_s: float = 600.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    unparseable_retries: int = 1
    price_input_per_mtok: float = 0.0
    price_output_per_mtok: float = 0.0

    def __post_init__(self):
        check_nonnegative("policy.max_concurrency", self.max_concurrency, integer=True, positive=True)
        check_optional("policy.requests_per_minute", self.requests_per_minute, positive=True)
        check_optional("policy.tokens_per_minute", self.tokens_per_minute, positive=True)
        check_nonnegative("policy.max_attempts", self.max_attempts, integer=True, positive=True)
        check_nonnegative("policy.timeout_s", self.timeout_s, positive=True)
        check_nonnegative("policy.deadline_s", self.deadline_s, positive=True)
        check_nonnegative("policy.backoff_base_s", self.backoff_base_s)
        check_nonnegative("policy.backoff_max_s", self.backoff_max_s)
        check_nonnegative("policy.unparseable_retries", self.unparseable_retries, integer=True)
        check_nonnegative("policy.price_input_per_mtok", self.price_input_per_mtok)
        check_nonnegative("policy.price_output_per_mtok", self.price_output_per_mtok)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.price_input_per_mtok + output_tokens * self.price_output_per_mtok) / 1e6


class RetryableError(Exception):
    """A failure worth retrying; ``retry_after`` is the server's ``Retry-After`` in seconds, if it gave one."""

    def __init__(self, reason: str, retry_after: float | None = None, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.retry_after = retry_after


class FatalCallError(Exception):
    """A failure that retrying cannot fix (bad request, authentication, unknown model)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` (or ``retry-after-ms``-converted) header; dates are not used by LLM APIs."""
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None


def backoff_wait(policy: CallPolicy):
    """A tenacity ``wait`` that honours ``Retry-After`` and otherwise backs off exponentially with full jitter."""

    def wait(retry_state) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(retry_after, policy.backoff_max_s)
        ceiling = min(policy.backoff_base_s * 2 ** (retry_state.attempt_number - 1), policy.backoff_max_s)
        return random.uniform(0, ceiling)

    return wait


class RateLimits:
    """Concurrency semaphore plus request- and token-rate leaky buckets."""

    def __init__(self, policy: CallPolicy):
        self.policy = policy
        self._semaphore: asyncio.Semaphore | None = None
        self._loop = None
        self._rpm = self._tpm = None

    def _bind(self) -> None:
        # asyncio primitives belong to one event loop; a new loop (a new asyncio.run) gets fresh ones
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._semaphore = asyncio.Semaphore(self.policy.max_concurrency)
            p = self.policy
            self._rpm = _smooth_limiter(p.requests_per_minute, 1.0) if p.requests_per_minute else None
            self._tpm = _smooth_limiter(p.tokens_per_minute, 4096.0) if p.tokens_per_minute else None

    @property
    def semaphore(self) -> asyncio.Semaphore:
        self._bind()
        return self._semaphore

    async def acquire_rate(self, estimated_tokens: int) -> None:
        self._bind()
        if self._rpm is not None:
            await self._rpm.acquire()
        if self._tpm is not None:
            await self._tpm.acquire(min(estimated_tokens, self._tpm.max_rate))


def _smooth_limiter(per_minute: float, min_burst: float) -> AsyncLimiter:
    """A leaky bucket refilling at ``per_minute / 60`` per second with a small burst (about one second's worth,
    at least ``min_burst``), the way providers replenish limits continuously; a bucket of a whole minute would
    let a cold start send a minute's quota at once and then trip the server's limiter."""
    burst = max(min_burst, per_minute / 60.0)
    return AsyncLimiter(burst, burst * 60.0 / per_minute)


class CallAllowance:
    """Billed calls a caller may still make beyond the ones it planned: re-asks after an unusable answer draw on
    it, so that a per-step cap holds with re-asks included. Shared by every request of a step (one event loop,
    so no lock is needed)."""

    def __init__(self, calls: int):
        self.left = max(int(calls), 0)
        self.refused = 0

    def take(self) -> bool:
        """One more call, if the allowance has it."""
        if self.left > 0:
            self.left -= 1
            return True
        self.refused += 1
        return False


REASK_ALLOWANCE: contextvars.ContextVar[CallAllowance | None] = contextvars.ContextVar("reask_allowance",
                                                                                        default=None)
"""The allowance of the running step's re-asks (``None``: re-ask as ``unparseable_retries`` says). Set it around
``judge_pairs``; tasks started inside inherit it."""
