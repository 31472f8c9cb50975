"""Pipelined rewards: batches sampled and scored ahead, trained on once their judge verdicts are in.

With ``reward_pipeline: s`` step t samples batch t (its PM scores and routing start the judge calls) and updates
on batch t − s, whose verdicts have had s steps to arrive. A :class:`PendingBatch` is everything the update needs
that was computed when the batch was sampled: the prompts, completions, the sampling policy's log-probabilities
(the PPO ratio's denominator for the stale update), the reference's, and the reward context with the PM's scores
(the routing hook merges the verdicts into it when the batch is due). Pending batches are saved in checkpoints
(:meth:`RewardPipeline.state_dict`); their judge calls are the routing hook's state.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

from lit_route.checks import check_nonnegative
from lit_route.policy.context import RewardContext

_CTX_FIELDS = [f.name for f in fields(RewardContext)]


@dataclass
class PendingBatch:
    """A sampled, scored batch waiting for its verdicts.

    Attributes:
        prompt_ids: (B·K, P) left-padded prompts, each repeated K times.
        prompt_mask: (B·K, P).
        completions: (B·K, T) sampled tokens.
        completion_mask: (B·K, T).
        old_logp: (B·K, T) the sampling policy's token log-probabilities; ``None`` for a batch trained on by the
            policy that sampled it (no reward pipeline): the update's own forward pass gives them.
        ref_logp: (B·K, T) the reference's.
        ctx: The batch's reward context (PM scores; verdicts are merged into it when it is due).
        trunk_hidden: (B·K, L, H) the frozen bottom's output (not checkpointed: recomputed by a full pass).
        version: Optimiser steps done when the batch was sampled (its staleness at update is measured from it).
        is_weights: (B·K, T) truncated importance-sampling weights of an engine's samples, or ``None``.
        engine_logp: (B·K, T) the engine's log-probs of its samples, kept while ``old_logp`` is ``None`` (the
            engine–trainer comparison waits for the update's pass); ``None`` otherwise.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completions: torch.Tensor
    completion_mask: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor
    ctx: RewardContext
    trunk_hidden: torch.Tensor | None = None
    version: int = 0
    is_weights: torch.Tensor | None = None
    engine_logp: torch.Tensor | None = None

    _TENSORS = ("prompt_ids", "prompt_mask", "completions", "completion_mask", "old_logp", "ref_logp")

    def state_dict(self) -> dict:
        """Plain containers and CPU tensors (a checkpoint loads them with ``weights_only``)."""
        if self.old_logp is None:
            raise ValueError("a batch without its sampling log-probs is trained on at once, never kept pending")
        state = {name: getattr(self, name).detach().cpu() for name in self._TENSORS}
        state["ctx"] = {name: getattr(self.ctx, name) for name in _CTX_FIELDS}
        state["ctx"] = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state["ctx"].items()}
        state["version"] = self.version
        state["is_weights"] = None if self.is_weights is None else self.is_weights.detach().cpu()
        return state

    def to(self, device: torch.device | str) -> PendingBatch:
        """The batch's tensors on ``device`` (a restored batch is loaded before the module is placed)."""
        for name in (*self._TENSORS, "is_weights", "engine_logp"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> PendingBatch:
        tensors = {name: state[name].to(device) for name in cls._TENSORS}
        weights = state.get("is_weights")
        return cls(**tensors, ctx=RewardContext(**state["ctx"]), version=int(state["version"]),
                   is_weights=None if weights is None else weights.to(device))


@dataclass
class Rollout:
    """One sampled batch, scored and turned into advantages: a :class:`PendingBatch` once its verdicts are in.

    Attributes:
        prompt_ids: (B·K, P) left-padded prompts, each repeated K times.
        prompt_mask: (B·K, P).
        completions: (B·K, T) sampled tokens.
        completion_mask: (B·K, T) real (non-padding) completion tokens.
        old_logp: (B·K, T) the sampling policy's token log-probabilities.
        advantages: (B·K,) RLOO advantages.
        pm_reward: (B, K) mean pairwise scores (after routing).
        kl: (B, K) per-sequence KL to the reference.
        ctx: The step's scores, routing marks, timings and statistics.
        trunk_hidden: (B·K, L, H) the hidden state entering the lowest adapted layer, when the frozen bottom
            is run once per batch (see :mod:`lit_route.models.split`); ``None`` otherwise.
        staleness: Optimiser steps taken since the batch was sampled (> 0 with a reward pipeline).
        is_weights: (B·K, T) truncated importance-sampling weights of an engine's samples, or ``None``.
        ref_logp: (B·K, T) the reference's log-probs, while ``old_logp``, ``kl`` and ``advantages`` wait for the
            first update's forward pass (they are ``None`` until it fills them in); ``None`` otherwise.
        engine_logp: (B·K, T) the engine's log-probs of its samples, waiting with them; ``None`` otherwise.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completions: torch.Tensor
    completion_mask: torch.Tensor
    old_logp: torch.Tensor | None
    advantages: torch.Tensor | None
    pm_reward: torch.Tensor
    kl: torch.Tensor | None
    ctx: RewardContext
    trunk_hidden: torch.Tensor | None = None
    staleness: int = 0
    is_weights: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    engine_logp: torch.Tensor | None = None


def check_pipeline(reward_pipeline: int, accumulate_batches: int) -> None:
    """``reward_pipeline`` (s) against the module's other options."""
    check_nonnegative("reward_pipeline", reward_pipeline, integer=True)
    if reward_pipeline and accumulate_batches > 1:
        raise ValueError("reward_pipeline: trains on one batch per optimiser step; set accumulate_batches: 1 "
                         "(or reward_pipeline: 0)")


class RewardPipeline:
    """The queue of pending batches, oldest first.

    Args:
        stages: s, the number of batches whose judge calls may be in flight while the policy trains.
    """

    def __init__(self, stages: int = 0):
        self.stages = stages
        self.queue: deque[PendingBatch] = deque()

    def __len__(self) -> int:
        return len(self.queue)

    def push(self, pending: PendingBatch) -> None:
        self.queue.append(pending)

    def due(self, batches_left: float = float("inf"), last_batch: bool = False) -> list[PendingBatch]:
        """The batches to train on now: the oldest once more than s are pending; all of them when the run has no
        more updates to give than batches pending (``batches_left``) or the data ends (``last_batch``), so every
        sampled batch is trained on exactly once."""
        if last_batch or len(self.queue) >= batches_left:
            out = list(self.queue)
            self.queue.clear()
            return out
        out = []
        while len(self.queue) > self.stages:
            out.append(self.queue.popleft())
        return out

    def state_dict(self) -> list[dict]:
        return [p.state_dict() for p in self.queue]

    def load_state_dict(self, state: list[dict], device: torch.device | str = "cpu") -> None:
        self.queue = deque(PendingBatch.from_state(s, device) for s in state or [])


def gather_ranks(local, world_size: int):
    """Every rank's ``local`` object as a list indexed by rank (only rank 0's checkpoint is written, so per-rank
    state travels in it as this list); ``[local]`` on one process."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [local]
    out: list = [None] * world_size
    dist.all_gather_object(out, local)
    return out


def drain_pending(module) -> int:
    """Trains ``module`` (an RLOO module under a Trainer) on the batches still pending when a fit ends before
    their turn (``trainer.should_stop`` set by EarlyStopping or any callback, ``max_time``): their judge calls are
    paid for, so they are waited for, charged and trained on, as the last batch of the data would be. The steps
    count as optimiser steps, are logged, and a ``save_last`` checkpoint is written again after them. Returns the
    batches trained."""
    trainer = module.trainer
    hooks = module.reward_hooks()
    batches = module.pipeline.due(last_batch=True)
    module.__dict__["_after_fit"] = True
    try:
        with _counted_steps(trainer):
            for pending in batches:
                rollout = module.finish_rollout(pending.to(module.device), hooks, trainer if hooks else None,
                                                module.global_step)
                with rollout.ctx.timer("update"):
                    loss = module._update(rollout, 0)
                module.log_step(rollout, loss)
    finally:
        module.__dict__["_after_fit"] = False
    for callback in trainer.checkpoint_callbacks:  # last.ckpt as the run ends, drained batches included
        if getattr(callback, "save_last", False) and getattr(callback, "last_model_path", ""):
            trainer.save_checkpoint(callback.last_model_path)
    return len(batches)


@contextmanager
def _counted_steps(trainer):
    """Optimiser steps taken after the fit loop has ended count in ``trainer.global_step`` as they do inside it
    (the manual-optimisation loop counts them only while it runs)."""
    manual = trainer.fit_loop.epoch_loop.manual_optimization
    optimizers = trainer.strategy._lightning_optimizers
    saved = [(opt._on_before_step, opt._on_after_step) for opt in optimizers]
    for opt in optimizers:
        opt._on_before_step, opt._on_after_step = manual._on_before_step, manual._on_after_step
    try:
        yield
    finally:
        for opt, (before, after) in zip(optimizers, saved, strict=True):
            opt._on_before_step, opt._on_after_step = before, after
