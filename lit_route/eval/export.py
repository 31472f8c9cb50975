"""Judged pairs as a preference file: every verdict the judge gave is a label the PM can learn from."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lit_route.types import PreferencePair


def judged_record(prompt, x: str, y: str, score: float | None, id: str, subset: str, source: str) -> dict | None:
    """``x`` vs ``y`` as judged (credit 1: x better, 0: y better) -> a ``{prompt, chosen, rejected, ...}`` record,
    or ``None`` for a tie or a failure (no label)."""
    if score not in (0.0, 1.0):
        return None
    chosen, rejected = (x, y) if score == 1.0 else (y, x)
    prompt = [dict(m) for m in prompt] if isinstance(prompt, tuple | list) else prompt
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "id": id, "subset": subset, "source": source}


def write_judged_pairs(path: str | Path, pairs: Sequence[PreferencePair], scores: Sequence[float | None],
                       source: str) -> int:
    """Writes the pairs with a decisive verdict (``scores``: the judge's credit for ``pair.chosen``); the judge's
    preferred response becomes ``chosen``, whatever the dataset said. Returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        for pair, score in zip(pairs, scores, strict=True):
            record = judged_record(pair.prompt, pair.chosen, pair.rejected, score, pair.id, pair.subset, source)
            if record is not None:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
    return written
