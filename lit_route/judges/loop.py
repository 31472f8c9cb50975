"""One long-lived event loop, in its own thread, on which every judge coroutine of a process runs.

The SDK clients (``AsyncAnthropic``, ``AsyncOpenAI``) keep pooled keep-alive connections bound to the loop that
opened them. Running each batch under a fresh ``asyncio.run`` closes that loop after the batch, and the next batch
finds its pooled connections dead: requests fail with ``Event loop is closed`` or are silently resent (and billed)
on a new connection. A single loop that lives as long as the process keeps the pool valid, lets rate limiters and
semaphores span batches, and lets a training step wait for judge results without blocking the loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import Future

_lock = threading.Lock()
_state: dict = {}


def _loop() -> asyncio.AbstractEventLoop:
    with _lock:
        # a forked child inherits the dict but not the thread: start a fresh loop there
        if _state.get("pid") != os.getpid() or not _state["thread"].is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="lit-route-judge-loop", daemon=True)
            thread.start()
            _state.update(pid=os.getpid(), loop=loop, thread=thread)
        return _state["loop"]


def submit(coro: Coroutine) -> Future:
    """Schedules ``coro`` on the judge loop; returns a :class:`concurrent.futures.Future` of its result."""
    loop = _loop()
    if threading.current_thread() is _state["thread"]:
        coro.close()
        raise RuntimeError("submit() called from the judge loop itself; await the coroutine instead")
    return asyncio.run_coroutine_threadsafe(coro, loop)


def run_sync(coro: Coroutine):
    """Runs ``coro`` on the judge loop and blocks until it is done (safe inside a running event loop too)."""
    return submit(coro).result()
