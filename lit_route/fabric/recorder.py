"""A Fabric logger that keeps the latest value of every metric a module logs (for progress lines and summaries)."""

from __future__ import annotations

from typing import Any

from lightning.fabric.loggers import Logger


class MetricsRecorder(Logger):
    """Keeps the last logged value of each metric; writes nothing."""

    def __init__(self):
        super().__init__()
        self.latest: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.latest.update({k: float(v) for k, v in metrics.items()})

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass
