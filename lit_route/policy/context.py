"""What a reward hook sees and may change during one RLOO step."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class RewardContext:
    """The group scores of one step.

    Attributes:
        prompts: B prompts (chat messages), as the judge should see them.
        completions: B lists of K decoded completions.
        scores: (B, K, K) antisymmetric score matrix S; hooks may replace entries (keeping S antisymmetric).
        uncertainty: (B, K, K) symmetric uncertainties U.
        pm_scores: (B, K, K) the PM's own S, untouched.
        judged: (B, K, K) boolean, True where a hook replaced the score.
        timings: seconds per phase of the step.
        stats: numbers hooks want logged.
        key: The batch's number among the run's sampled batches (set by the routing hook; keys its judge calls).
    """

    prompts: list
    completions: list[list[str]]
    scores: torch.Tensor
    uncertainty: torch.Tensor
    pm_scores: torch.Tensor
    judged: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    key: int | None = None

    @contextmanager
    def timer(self, name: str):
        """Adds the seconds of the block to ``timings[name]``. GPU kernels run asynchronously: the queued work
        is waited for at both ends, so that a phase is charged for its own kernels and not for the last phase's."""
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def _synchronize() -> None:
    """Waits for the current CUDA device's queued work (nothing to wait for when CUDA was never used)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


class RewardHook:
    """Callbacks with these methods take part in reward computation (all optional).

    ``on_pairwise_scores(trainer, module, ctx)`` runs as soon as the PM scores exist (start slow work here: it
    overlaps the reference log-probabilities); ``on_before_rewards(trainer, module, ctx)`` runs just before
    rewards are formed (finish it here and edit ``ctx.scores``).
    """
