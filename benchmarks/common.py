"""Timing helpers shared by the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import statistics
import time

import lightning as L


def timed(fn, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class StepTimer(L.Callback):
    """Wall time of each Lightning training step, and the module's ``last_step`` time split when it has one."""

    def __init__(self):
        self.times: list[float] = []
        self.splits: list[dict[str, float]] = []

    def on_train_batch_start(self, *args):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, *args):
        self.times.append(time.perf_counter() - self._start)
        last = getattr(module, "last_step", None)
        if last:
            self.splits.append({k: v for k, v in last.items() if k.startswith("time/")})


def trl_step_timer(times: list[float]):
    """A transformers ``TrainerCallback`` that appends each optimiser step's wall time to ``times``."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.start)

    return Timer()
