"""Shared driver of remote judges: rate limits, retries, deadline, verdict parsing, statistics.

A backend supplies ``complete(system, user) -> Completion`` and an ``classify(exc)`` that maps its SDK's
exceptions to :class:`RetryableError` / :class:`FatalCallError`; this module does the rest.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, stop_after_delay

from lit_route.judges.base import JudgeStats
from lit_route.judges.limits import (
    REASK_ALLOWANCE,
    CallPolicy,
    FatalCallError,
    RateLimits,
    RetryableError,
    backoff_wait,
)
from lit_route.judges.prompt import DEFAULT, PromptFormat
from lit_route.types import JudgeRequest, Verdict


@dataclass
class Completion:
    """What one call returned: the final answer text (reasoning excluded) and billed tokens."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    truncated: bool = False


Complete = Callable[[str, str], Awaitable[Completion]]

CALL_LOG: contextvars.ContextVar = contextvars.ContextVar("call_log", default=None)
"""Where the running request's calls are written down, each before it is sent and again when it returns: an
object with ``sent(estimate_usd) -> id`` and ``answered(id, billed, cost_usd)`` (``None``: nowhere). Set by
:class:`~lit_route.routing.journal.MeteredJudge` around each request; the tasks started inside inherit it."""


def estimate_tokens(system: str, user: str) -> tuple[int, int]:
    """The ``(input, output)`` tokens a call is assumed to take before it is made: about four characters a token
    in, 1024 out. The token rate limit is charged their sum; a call whose answer was never read is priced by them."""
    return (len(system) + len(user)) // 4, 1024


def classify_http_error(status: int | None, headers, detail: str) -> Exception:
    """Maps an HTTP status to a retryable or fatal error (shared by the SDK backends)."""
    from lit_route.judges.limits import parse_retry_after

    retry_after = None
    if headers is not None:
        ms = headers.get("retry-after-ms")
        retry_after = parse_retry_after(ms) / 1000 if parse_retry_after(ms) is not None else parse_retry_after(
            headers.get("retry-after")
        )
    if status == 429:
        return RetryableError("rate_limit", retry_after, detail)
    if status == 529:
        return RetryableError("overloaded", retry_after, detail)
    if status in (408, 409) or (status is not None and status >= 500):
        return RetryableError("server_error", retry_after, detail)
    return FatalCallError("client_error" if status else "error", detail)


def classify_sdk_error(sdk, err: BaseException) -> Exception:
    """Maps an exception of the ``anthropic`` or ``openai`` SDK (they share one hierarchy) to a retryable or fatal
    error. A body that is not valid JSON, or that the SDK could not validate, is a malformed response, worth a
    retry. Anything else (``TypeError``, ``KeyError``, ``AttributeError``, ...) is a programming error and is
    returned unchanged, so the caller raises it instead of retrying and paying for it again."""
    if isinstance(err, sdk.APITimeoutError):
        return RetryableError("timeout", None, str(err))
    if isinstance(err, sdk.APIConnectionError):
        return RetryableError("connection", None, str(err))
    if isinstance(err, sdk.APIStatusError):
        return classify_http_error(err.status_code, err.response.headers, str(err)[:300])
    if isinstance(err, json.JSONDecodeError | sdk.APIResponseValidationError):
        return RetryableError("malformed_response", None, repr(err)[:300])
    return err


async def run_requests(
    requests: Sequence[JudgeRequest],
    complete: Complete,
    classify: Callable[[BaseException], Exception],
    policy: CallPolicy,
    limits: RateLimits,
    stats: JudgeStats,
    fmt: PromptFormat | None = None,
) -> list[Verdict]:
    """Judges every request concurrently under ``policy``, shown and parsed in ``fmt`` (default: the built-in
    format); one :class:`Verdict` per request, in order."""

    async def one(request: JudgeRequest) -> Verdict:
        async with limits.semaphore:
            verdict = await _judge_one(request, complete, classify, policy, limits, stats, fmt or DEFAULT)
        stats.record(verdict)
        return verdict

    return list(await asyncio.gather(*(one(r) for r in requests)))


async def _judge_one(request, complete, classify, policy, limits, stats, fmt: PromptFormat) -> Verdict:
    system, user = fmt.render(request)
    estimate = sum(estimate_tokens(system, user))
    start = time.perf_counter()
    counts = {"requests": 0, "billed": 0}
    in_tok = out_tok = 0
    text = ""

    def verdict(preference, failure=None, raw="") -> Verdict:
        return Verdict(preference, failure=failure, raw=raw, latency_s=time.perf_counter() - start,
                       input_tokens=in_tok, output_tokens=out_tok, cost_usd=policy.cost(in_tok, out_tok),
                       requests=counts["requests"], billed=counts["billed"])

    for attempt in range(policy.unparseable_retries + 1):
        allowance = REASK_ALLOWANCE.get()
        if attempt > 0 and allowance is not None and not allowance.take():
            break  # a re-ask is a billed call: with the step's cap reached, the answer stays unusable
        try:
            completion = await _call_with_retries(system, user, complete, classify, policy, limits, stats, estimate,
                                                  counts)
        except (RetryableError, FatalCallError) as err:
            return verdict(None, failure=err.reason, raw=str(err)[:500])
        in_tok += completion.input_tokens
        out_tok += completion.output_tokens
        text = completion.text
        preference = fmt.parse(text)
        if preference is not None:
            return verdict(preference, raw=text)
    reason = "empty" if not text.strip() else ("truncated" if completion.truncated else "unparseable")
    return verdict(None, failure=reason, raw=text[-2000:])


async def _call_with_retries(system, user, complete, classify, policy, limits, stats, estimate, counts) -> Completion:
    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.max_attempts) | stop_after_delay(policy.deadline_s),
        wait=backoff_wait(policy),
        retry=retry_if_exception_type(RetryableError),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            if attempt.retry_state.attempt_number > 1:
                stats.retries += 1
            await limits.acquire_rate(estimate)
            counts["requests"] += 1
            log = CALL_LOG.get()
            call = log.sent(policy.cost(*estimate_tokens(system, user))) if log is not None else None
            try:
                completion = await _attempt(system, user, complete, classify, policy)
            except Exception:  # not billed; a cancelled call (a kill, a teardown) stays "sent": it may have been
                if call is not None:
                    log.answered(call, 0, 0.0)
                raise
            counts["billed"] += 1
            if call is not None:
                log.answered(call, 1, policy.cost(completion.input_tokens, completion.output_tokens))
            return completion
    raise RetryableError("deadline")  # unreachable: tenacity re-raises the last error


async def _attempt(system, user, complete, classify, policy) -> Completion:
    """One request; its failures as :class:`RetryableError` or :class:`FatalCallError` (programming errors as
    they are)."""
    try:
        return await asyncio.wait_for(complete(system, user), timeout=policy.timeout_s)
    except asyncio.TimeoutError as err:
        raise RetryableError("timeout", None, f"no answer within {policy.timeout_s}s") from err
    except (RetryableError, FatalCallError):
        raise
    except Exception as err:  # SDK exceptions: classified; programming errors come back as they are
        raise classify(err) from err
