"""An ``UncertaintyRouting`` that writes down, per rank and step, what it saw and decided (for multi-process tests
that must compare ranks). Importable by class_path when ``tests/`` is on the Python path."""

from __future__ import annotations

import json
import os

from lit_route.callbacks import UncertaintyRouting


class RecordingRouting(UncertaintyRouting):
    """Appends one JSON line per step to ``<out_dir>/rank<r>.jsonl``: the local uncertainties of the step's
    pairs, which of them were routed, and the budget ledger after the step."""

    def __init__(self, out_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self._row: dict = {}

    def _route(self, trainer, module, d_pairs, u_pairs):
        assign, routed, audit = super()._route(trainer, module, d_pairs, u_pairs)
        self._row = {"step": trainer.global_step, "u": u_pairs.flatten().tolist(), "routed": routed.flatten().tolist()}
        return assign, routed, audit

    def on_before_rewards(self, trainer, module, ctx):
        super().on_before_rewards(trainer, module, ctx)
        row = {**self._row, "ledger": self.ledger.state_dict(), "seen": self.pairs_seen, "routed_total": self.pairs_routed}
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.jsonl"), "a") as fh:
            fh.write(json.dumps(row) + "\n")
