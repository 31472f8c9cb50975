"""Callbacks for resume tests: record the prompts each finished training step used; die at a given step."""

from __future__ import annotations

import json
import os
import signal

from lightning.pytorch.callbacks import Callback


class PromptLog(Callback):
    """Appends one JSON line per finished training step: the step, the epoch and the prompts of its batch."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                 "messages": batch["messages"]}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class KillAt(Callback):
    """``kill -9`` of the own process when training step ``step`` is about to run (its batch already fetched)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
