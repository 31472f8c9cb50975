"""``pm score`` files: one JSON line per pair with the PM's score ``d`` and uncertainty ``ū``, written by
``lit-route pm score`` and read back by ``evaluate --scores``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def write_scores(path, pairs, d: torch.Tensor, u: torch.Tensor) -> None:
    """Writes a ``pm score`` file: one ``{"id", "subset", "score", "uncertainty", "correct"}`` row per pair, in
    the order of ``pairs`` (what :func:`read_scores` and ``evaluate --scores`` read back)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for p, s, v in zip(pairs, d.tolist(), u.tolist(), strict=True):
            fh.write(json.dumps({"id": p.id, "subset": p.subset, "score": s, "uncertainty": v, "correct": s > 0}) + "\n")


def read_scores(path: str, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """``pm score`` output matched to ``pairs`` by id (every pair must have a finite score and uncertainty)."""
    rows = {}
    with open(path) as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    values = (float(row["score"]), float(row["uncertainty"]))
                    rows[str(row["id"])] = values
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"{path}:{number}: not a score line ({err})") from err
                for name, value in zip(("score", "uncertainty"), values, strict=True):
                    if not math.isfinite(value):
                        raise ValueError(f"{path}:{number}: field '{name}': not a finite number ({value})")
    missing = [p.id for p in pairs if p.id not in rows]
    if missing:
        raise ValueError(f"scores: {len(missing)} pairs have no score in {path}, e.g. {missing[:3]}")
    d = torch.tensor([rows[p.id][0] for p in pairs])
    u = torch.tensor([rows[p.id][1] for p in pairs])
    return d, u
