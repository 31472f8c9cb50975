"""What a reward hook reads from ``trainer``, backed by Fabric.

:class:`~lit_route.callbacks.UncertaintyRouting` and other reward hooks receive ``trainer`` and use only its
``world_size``, ``global_rank``, ``global_step``, ``strategy.all_gather(t)`` and
``strategy.reduce(t, reduce_op="sum")``; this view provides those, so the same callback object runs under both
engines.
"""

from __future__ import annotations

import torch


class _StrategyView:
    def __init__(self, fabric):
        self._fabric = fabric

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(…) -> (world, …) on every rank."""
        return self._fabric.all_gather(tensor)

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        """All-reduce across ranks (``sum`` or ``mean``)."""
        return self._fabric.all_reduce(tensor, reduce_op=reduce_op)


class FabricTrainerView:
    """The Trainer attributes reward hooks use, for a Fabric loop; the loop advances ``global_step``.

    Args:
        fabric: The launched Fabric.
        callbacks: The run's callbacks (as ``trainer.callbacks``).
    """

    def __init__(self, fabric, callbacks=()):
        self.fabric = fabric
        self.strategy = _StrategyView(fabric)
        self.callbacks = list(callbacks)
        self.global_step = 0
        self.default_root_dir: str | None = None  # the run's folder (the routing hook keeps its journal there)

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    @property
    def global_rank(self) -> int:
        return self.fabric.global_rank

    @property
    def is_global_zero(self) -> bool:
        return self.fabric.is_global_zero
