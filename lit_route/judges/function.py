"""``FunctionJudge``: a Python callable ``(prompt, response_a, response_b) -> "A" | "B" | "tie"`` as the judge.

The callable is named by its import path, so a YAML config can plug in a program-checked verifier (unit tests,
a math checker, instruction constraints) wherever an LLM judge goes: routing, evaluation, caching and statistics
work the same. A callable that raises, times out or returns anything else is a failed call with the reason,
never a verdict.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any

from lit_route.checks import check_nonnegative, check_optional
from lit_route.judges.base import JudgeStats
from lit_route.types import JudgeRequest, Preference, Verdict

_VERDICTS = {"a": Preference.A, "b": Preference.B, "tie": Preference.TIE}


def import_callable(path: str, option: str = "function") -> Callable[..., Any]:
    """The object at ``package.module:attribute`` (or ``package.module.attribute``).

    Raises:
        ValueError: naming ``option`` and the path, when the module or attribute does not exist or is not callable.
    """
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{option}: expected 'package.module:name', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{option}: cannot import module {module_name!r} of {path!r} ({err})") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{option}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{option}: {path!r} is not callable")
    return obj


def _is_async(fn: Callable) -> bool:
    # a callable object's coroutine is its ``__call__`` method
    call = type(fn).__call__ if not inspect.isroutine(fn) else None
    return inspect.iscoroutinefunction(fn) or (call is not None and inspect.iscoroutinefunction(call))


def to_preference(value: Any) -> Preference | None:
    """``"A"``, ``"B"``, ``"tie"`` (any case, surrounding space ignored) or a :class:`Preference`; else ``None``."""
    if isinstance(value, Preference):
        return value
    if isinstance(value, str):
        return _VERDICTS.get(value.strip().lower())
    return None


class FunctionJudge:
    """Calls ``function(prompt, response_a, response_b)`` once per request.

    Synchronous callables run in worker threads, asynchronous ones on the event loop; at most
    ``max_concurrency`` calls are in flight. Failures (``preference=None``): ``error:<ExceptionType>`` when the
    callable raises, ``invalid_verdict`` when it returns something other than A / B / tie, ``timeout`` past
    ``timeout_s``. Each call is one request, timed and counted in ``stats``; one that returns (a verdict or not) is
    billed, so the routing callback's call caps apply to it as to a server. Behind :class:`~lit_route.judges.CachedJudge`
    a verdict is cached under ``model``.

    Args:
        function: Import path of the callable, ``package.module:name`` (a callable object also works from Python).
        model: The name in statistics and in the cache key (default: the import path). Change it when the
            callable's logic changes, so cached verdicts of the old logic are not reused.
        max_concurrency: Calls in flight at once.
        timeout_s: Time limit of one call (``None``: none). A timed-out synchronous call finishes in its thread.
    """

    name = "function"

    def __init__(
        self,
        function: str | Callable[..., Any],
        model: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float | None = None,
    ):
        check_nonnegative("max_concurrency", max_concurrency, integer=True, positive=True)
        check_optional("timeout_s", timeout_s, positive=True)
        if isinstance(function, str):
            self.function_path, self.fn = function, import_callable(function)
        elif callable(function):
            self.fn = function
            self.function_path = f"{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', repr(function))}"
        else:
            raise ValueError(f"function: expected an import path or a callable, got {type(function).__name__}")
        self.model = model or self.function_path
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self.stats = JudgeStats()
        self._async = _is_async(self.fn)
        self._loop = None
        self._semaphore: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        return f"FunctionJudge(function={self.function_path!r})"

    def identity(self) -> dict:
        """What the verdict cache keys on: the callable's import path and ``model``."""
        return {"backend": self.name, "model": self.model, "function": self.function_path}

    def _slots(self) -> asyncio.Semaphore:
        # asyncio primitives belong to one event loop; a new loop gets a fresh semaphore
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._semaphore = loop, asyncio.Semaphore(self.max_concurrency)
        return self._semaphore

    async def _invoke(self, request: JudgeRequest) -> Any:
        args = (request.prompt, request.response_a, request.response_b)
        if self._async:
            return await self.fn(*args)
        result = await asyncio.to_thread(self.fn, *args)
        return await result if inspect.isawaitable(result) else result

    async def _one(self, request: JudgeRequest) -> Verdict:
        async with self._slots():
            start = time.perf_counter()
            try:
                if self.timeout_s is None:
                    value = await self._invoke(request)
                else:
                    value = await asyncio.wait_for(self._invoke(request), self.timeout_s)
            except asyncio.TimeoutError:
                return Verdict(None, failure="timeout", latency_s=time.perf_counter() - start, requests=1)
            except Exception as err:  # the callable's own error: a failed call with its type, never a verdict
                return Verdict(None, failure=f"error:{type(err).__name__}", raw=str(err)[:500],
                               latency_s=time.perf_counter() - start, requests=1)
            latency = time.perf_counter() - start
        # a call that returned counts as billed, like a completion from a server, whatever it returned
        preference = to_preference(value)
        if preference is None:
            return Verdict(None, failure="invalid_verdict", raw=repr(value)[:500], latency_s=latency, requests=1,
                           billed=1)
        return Verdict(preference, raw=preference.value, latency_s=latency, requests=1, billed=1)

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        verdicts = await asyncio.gather(*(self._one(r) for r in requests))
        for verdict in verdicts:
            self.stats.record(verdict)
        return list(verdicts)
