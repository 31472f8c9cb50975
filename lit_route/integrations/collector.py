"""``GroupCollector``: gathers the samples of a prompt from concurrent requests into groups, scores each group once.

The pairwise reward of a sample needs the other completions of its prompt. When a request carries whole groups
(OpenRLHF up to 0.9.0: a rollout batch per request) they are scored at once, in the request's own thread; when
the samples of a group arrive in separate requests (OpenRLHF 0.9.1+: one request per sample, all of a prompt's
samples in flight together), each request waits until ``group_size`` samples of its prompt have arrived, and the
request that completes the group scores it for all of them. A group still short after ``wait_s`` is scored as it
is (a lone sample gets reward 0: it has nothing to be compared with, and the count says so in ``/stats``). A
request may name its own group size (an evaluation round with fewer samples per prompt than training): a group
then closes at the size named by the request that opened it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lit_route.checks import check_nonnegative
from lit_route.integrations.groups import keyed_groups, prompt_key
from lit_route.integrations.openrlhf import Sample


@dataclass
class Scored:
    """What a scored sample gets back: its reward, its PM-only reward, and how many of its pairs were judged."""

    reward: float
    pm_reward: float
    judged: int


@dataclass(eq=False)
class _Pending:
    size: int  # the group closes at this many samples
    slots: list = field(default_factory=list)


@dataclass(eq=False)
class _Slot:
    sample: Sample
    done: threading.Event = field(default_factory=threading.Event)
    result: Scored | None = None
    error: BaseException | None = None


ScoreFn = Callable[[list[list[Sample]]], list[list[Scored]]]
"""Scores groups of samples (each group shares a prompt, at least two samples) -> one result per sample."""


class GroupCollector:
    """Forms groups from concurrent requests and hands them to ``score`` (thread-safe).

    Args:
        score: Scores a list of groups (each at least two samples of one prompt).
        group_size: Samples per prompt (OpenRLHF's ``n_samples_per_prompt``); ``None``: every request carries
            whole groups, and its samples are grouped by prompt as they are.
        wait_s: How long a request waits for the rest of its group before it is scored short.
    """

    def __init__(self, score: ScoreFn, group_size: int | None = None, wait_s: float = 60.0):
        if group_size is not None and (not isinstance(group_size, int) or group_size < 2):
            raise ValueError(f"group_size: expected an integer >= 2 (samples per prompt), got {group_size}")
        check_nonnegative("group_wait_s", wait_s)
        self._score, self.group_size, self.wait_s = score, group_size, wait_s
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self.counts = {"groups": 0, "short_groups": 0, "singletons": 0}

    def rewards(self, samples: Sequence[Sample], group_size: int | None = None) -> list[Scored]:
        """One result per sample, in order, once every sample's group has been scored. ``group_size``: this
        request's samples per prompt, instead of the collector's.

        Raises:
            Exception: what scoring raised, for every request whose samples were in that call.
        """
        slots = [_Slot(s) for s in samples]
        size = group_size or self.group_size
        if size is None:
            self._run([([slots[i] for i in g], None) for g in keyed_groups([s.prompt for s in samples])])
        else:
            ready: list[tuple[list[_Slot], int]] = []
            with self._lock:
                for slot in slots:
                    key = prompt_key(slot.sample.prompt)
                    group = self._pending.setdefault(key, _Pending(size))
                    group.slots.append(slot)
                    if len(group.slots) == group.size:
                        ready.append((self._pending.pop(key).slots, group.size))
            if ready:
                self._run(ready)
            self._wait(slots)
        for slot in slots:
            if slot.error is not None:
                raise slot.error
        return [slot.result for slot in slots]  # type: ignore[misc]

    def _wait(self, slots: list[_Slot]) -> None:
        deadline = time.monotonic() + self.wait_s
        for slot in slots:
            if slot.done.wait(max(deadline - time.monotonic(), 0.0)):
                continue
            short: list[tuple[list[_Slot], int]] = []
            with self._lock:  # still pending: take its group out, so no later sample joins a group being scored
                key = prompt_key(slot.sample.prompt)
                group = self._pending.get(key)
                if group is not None and slot in group.slots:
                    short.append((self._pending.pop(key).slots, group.size))
            if short:
                self._run(short)
            slot.done.wait()  # scored here, or by the request that completed or flushed its group

    def _run(self, sized: list[tuple[list[_Slot], int | None]]) -> None:
        """Scores groups, each with the size it was meant to have (``None``: a request's whole group)."""
        groups = [g for g, _ in sized]
        lone = [g for g in groups if len(g) < 2]
        multi = [g for g in groups if len(g) >= 2]
        with self._lock:
            self.counts["groups"] += len(groups)
            self.counts["singletons"] += len(lone)
            self.counts["short_groups"] += sum(size is not None and len(g) < size for g, size in sized)
        for g in lone:
            g[0].result = Scored(0.0, 0.0, 0)
            g[0].done.set()
        if not multi:
            return
        try:
            results = self._score([[slot.sample for slot in g] for g in multi])
            for g, res in zip(multi, results, strict=True):
                for slot, r in zip(g, res, strict=True):
                    slot.result = r
        except BaseException as err:  # every waiting request must learn of it, not hang
            for g in multi:
                for slot in g:
                    slot.error = err
        finally:
            for g in multi:
                for slot in g:
                    slot.done.set()
