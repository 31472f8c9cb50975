"""RLOO under Fabric: the Trainer's manual-optimisation step as an explicit loop over the same module.

Each step is :meth:`RLOOPolicyModule.rollout` (sampling, PM scores, reward hooks such as
:class:`~lit_route.callbacks.UncertaintyRouting`, advantages; no gradients) on the bare module, then
:meth:`RLOOPolicyModule.update_loss` through the strategy's wrapper (so DDP synchronises the gradients) and the
optimiser step. The hooks receive a :class:`~lit_route.fabric.view.FabricTrainerView` as ``trainer``; their
state (the routing budget ledger) is saved in the checkpoint and restored on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lit_route.fabric.checkpoint import load_checkpoint, save_checkpoint
from lit_route.fabric.pm import DEFAULT_MAX_EPOCHS
from lit_route.fabric.settings import LoopSettings
from lit_route.fabric.view import FabricTrainerView


def _split_callbacks(callbacks, loop: LoopSettings, fabric) -> list:
    """Reward hooks take part in every step; a ``ModelCheckpoint`` sets the checkpoint cadence; others are
    Trainer callbacks that this loop does not run (said once)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    hooks = []
    for cb in callbacks:
        if hasattr(cb, "on_pairwise_scores") or hasattr(cb, "on_before_rewards"):
            hooks.append(cb)
        elif isinstance(cb, ModelCheckpoint):
            loop.checkpoint_every_n_steps = cb._every_n_train_steps or loop.checkpoint_every_n_steps
        else:
            fabric.print(f"trainer.callbacks: {type(cb).__name__} is a Trainer callback; the Fabric engine skips it")
    return hooks


def fit_rloo(fabric, module, datamodule, loop: LoopSettings | None = None, callbacks=(), ckpt_path: str | None = None
             ) -> dict[str, Any]:
    """Runs RLOO steps until ``loop.max_steps`` optimiser steps (or ``loop.max_epochs`` over the prompts).

    Args:
        fabric: A launched :class:`lightning.fabric.Fabric` (``ddp`` or ``deepspeed``: sampling needs every
            rank to hold the whole policy, which FSDP does not).
        module: An :class:`~lit_route.policy.module.RLOOPolicyModule`, not yet set up.
        datamodule: A :class:`~lit_route.policy.data.PromptDataModule`.
        loop: Steps, epochs, logging, output folder.
        callbacks: The run's callbacks (``trainer.callbacks`` of the config).
        ckpt_path: Resume from this ``checkpoints/last.ckpt`` (weights, optimiser, step, callback states).

    Returns:
        A summary: steps, the last step's metrics, the callbacks' states, the checkpoint path.
    """
    from lightning.fabric.strategies import FSDPStrategy

    if isinstance(fabric.strategy, FSDPStrategy):
        raise ValueError("trainer.strategy: the RLOO loop samples from the whole policy on every rank; use ddp "
                         "or deepspeed (FSDP shards the parameters generation needs)")
    loop = loop or LoopSettings()
    hooks = _split_callbacks(callbacks, loop, fabric)
    datamodule.connect(module, fabric.world_size, fabric.global_rank)
    datamodule.setup("fit")
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    model.mark_forward_method("update_loss")
    module.on_fit_start()  # the reward PM to the module's device
    view = FabricTrainerView(fabric, callbacks)
    view.default_root_dir = loop.default_root_dir
    hp = module.hparams
    data_key = type(datamodule).__qualname__  # where the Trainer keeps a datamodule's state
    state: dict[str, Any] = {"state_dict": model, "optimizer": optimizer, "global_step": 0, "callbacks": {},
                             data_key: {}}
    if ckpt_path:
        rest = load_checkpoint(fabric, ckpt_path, state)
        module.on_load_checkpoint(rest)
        for cb in hooks:
            if cb.state_key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][cb.state_key])
        if state[data_key]:  # the prompts consumed so far: the loader built below starts after them
            datamodule.load_state_dict(state[data_key])
    # the datamodule shards the prompts itself (connect) and keeps the epoch and position of its sampler, so the
    # loader is not handed to Fabric, whose wrapper would reset the sampler's epoch; batches are moved below
    loader = datamodule.train_dataloader()
    view.global_step = state["global_step"]
    if module.batches_sampled is None:  # a fresh run, or a checkpoint from before batches were counted
        module.batches_sampled = view.global_step * hp.accumulate_batches
    max_steps = loop.max_steps if loop.max_steps >= 0 else float("inf")
    epochs = loop.max_epochs if loop.max_epochs is not None else (
        DEFAULT_MAX_EPOCHS if loop.max_steps < 0 else 10**9)  # with max_steps, epochs until the steps are done
    root = Path(loop.default_root_dir)
    last_ckpt = root / "checkpoints" / "last.ckpt"
    epoch = datamodule.epoch
    fabric.print(f"rloo: {'' if max_steps == float('inf') else f'{max_steps} steps, '}world size {fabric.world_size}, "
                 f"reward hooks: {[type(h).__name__ for h in hooks] or 'none (PM rewards only)'}")

    def save_last() -> None:
        save_checkpoint(fabric, last_ckpt, model, module, optimizer=optimizer, global_step=view.global_step,
                        callbacks={cb.state_key: cb.state_dict() for cb in hooks},
                        **{data_key: datamodule.state_dict()})

    def train(rollout, i: int):
        with rollout.ctx.timer("update"):
            for update in range(hp.updates_per_batch):
                accumulating = update == 0 and (i + 1) % hp.accumulate_batches != 0
                with fabric.no_backward_sync(model, enabled=accumulating):
                    loss = model.update_loss(rollout, update)
                    fabric.backward(loss / hp.accumulate_batches)
                if accumulating:
                    continue
                if hp.max_grad_norm is not None:
                    fabric.clip_gradients(model, optimizer, max_norm=hp.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                view.global_step += 1
        module.log_step(rollout, loss.detach())

    def train_due(i: int, last_batch: bool = False) -> None:
        # pipelined: train on the batches whose turn has come (their verdicts are waited for here)
        for pending in module.pipeline.due(module.batches_left(loop.max_steps, view.global_step), last_batch):
            train(module.finish_rollout(pending, hooks, view, view.global_step), i)

    try:
        while epoch < epochs and view.global_step < max_steps:
            datamodule.sampler.set_epoch(epoch)
            for i, batch in enumerate(loader):
                batch = datamodule.on_after_batch_transfer(fabric.to_device(batch), 0)  # counts the prompts used
                before = view.global_step
                if hp.get("reward_pipeline", 0):
                    module.pipeline.push(module.start_rollout(batch, module.next_batch(), hooks, view,
                                                              view.global_step))
                    train_due(i)
                else:
                    train(module.rollout(batch, module.next_batch(), hooks, view), i)
                step = view.global_step
                if step == before:  # the pipeline is filling: nothing trained yet
                    continue
                if step % loop.log_every_n_steps == 0 or step >= max_steps:
                    last = module.last_step
                    fabric.print(f"step {step} judged {last['judge/fraction']:.3f} kl {last['kl/mean']:.4f} "
                                     f"reward_std {last['reward/std']:.3f} loss {last['train/loss']:.4f}")
                if loop.checkpoint_every_n_steps and step % loop.checkpoint_every_n_steps == 0:
                    save_last()
                if step >= max_steps:
                    break
            else:
                epoch += 1
        if len(module.pipeline):  # the data ended with batches still pending: train on them too
            train_due(0, last_batch=True)
        save_last()
    finally:
        for cb in hooks:
            if hasattr(cb, "teardown"):
                cb.teardown(view, module, "fit")
        for logger in fabric.loggers:
            logger.finalize("success")
    return {"global_step": view.global_step, "world_size": fabric.world_size, "last_ckpt": str(last_ckpt),
            "last_step": getattr(module, "last_step", {}),
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in hooks}}
