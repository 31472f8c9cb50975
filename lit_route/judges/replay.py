"""``ReplayJudge``: verdicts recorded earlier, matched by a content hash of exactly what the judge saw."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from lit_route.checks import check_nonnegative
from lit_route.data.io import DataFormatError, iter_records, resolve_path
from lit_route.judges.base import JudgeStats
from lit_route.judges.prompt import render
from lit_route.types import JudgeRequest, Preference, Verdict


def content_key(prompt: str, response_a: str, response_b: str) -> str:
    """SHA-256 of the ordered triple; ``a`` and ``b`` swapped is a different key."""
    blob = json.dumps([prompt, response_a, response_b], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplayJudge:
    """Replays recorded verdicts (``{"judge", "prompt", "response_a", "response_b", "winner"}`` JSON lines).

    A request with no record is a failure (``no_record``), never a guess; a recorded ``winner: null`` (the
    judge's answer could not be parsed) is a failure (``unparseable``), as it was.

    Recorded verdicts carry no token counts. With prices set, each replayed verdict is charged an estimate: the
    prompt as this project renders it at 4 characters a token, plus ``output_tokens``. The estimates make judges
    comparable by cost (a cascade of a cheap and a strong judge, say); they are not invoices.

    Args:
        path: Verdict file; ``bundled:llmbar/verdicts.jsonl.gz`` holds GPT-4, ChatGPT, PaLM2, LLaMA2 and
            Falcon verdicts on the LLMBar sets in both display orders.
        judge: Which recorded judge to replay (the ``judge`` field).
        price_input_per_mtok: USD per million input tokens of the recorded judge.
        price_output_per_mtok: USD per million output tokens.
        output_tokens: Estimated tokens of one recorded answer.
    """

    name = "replay"

    def __init__(self, path: str = "bundled:llmbar/verdicts.jsonl.gz", judge: str = "GPT-4",
                 price_input_per_mtok: float = 0.0, price_output_per_mtok: float = 0.0, output_tokens: int = 0):
        check_nonnegative("price_input_per_mtok", price_input_per_mtok)
        check_nonnegative("price_output_per_mtok", price_output_per_mtok)
        check_nonnegative("output_tokens", output_tokens, integer=True)
        self.prices = (price_input_per_mtok, price_output_per_mtok)
        self.output_tokens = output_tokens
        self.path, self.model = path, judge
        self.stats = JudgeStats()
        self._records: dict[str, str | None] = {}
        resolved = resolve_path(path)
        judges = set()
        for line, record in iter_records(resolved):
            if not isinstance(record, dict):
                raise DataFormatError(resolved, line, "expected a JSON object")
            for key in ("judge", "prompt", "response_a", "response_b"):
                if not isinstance(record.get(key), str):
                    raise DataFormatError(resolved, line, "missing or not a string", key)
            winner = record.get("winner")
            if winner not in ("A", "B", "tie", "TIE", None):
                raise DataFormatError(resolved, line, f"expected A, B, tie or null, got {winner!r}", "winner")
            judges.add(record["judge"])
            if record["judge"] == judge:
                self._records[content_key(record["prompt"], record["response_a"], record["response_b"])] = winner
        if not self._records:
            raise ValueError(f"judge: no verdicts by {judge!r} in {path}; recorded judges: {sorted(judges)}")

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"ReplayJudge(path={self.path!r}, judge={self.model!r})"

    def identity(self) -> dict:
        """What the verdicts depend on (the verdict cache keys on it)."""
        return {"backend": self.name, "model": self.model, "path": str(self.path), "prices": list(self.prices),
                "output_tokens": self.output_tokens}

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        out = []
        for request in requests:
            key = content_key(request.prompt, request.response_a, request.response_b)
            if key not in self._records:
                verdict = Verdict(None, failure="no_record", requests=1)
            elif self._records[key] is None:
                verdict = Verdict(None, failure="unparseable", requests=1, billed=1)
            else:
                winner = self._records[key]
                in_tok = sum(len(part) for part in render(request)) // 4
                cost = (in_tok * self.prices[0] + self.output_tokens * self.prices[1]) / 1e6
                verdict = Verdict(Preference.TIE if winner.lower() == "tie" else Preference(winner), raw=winner,
                                  requests=1, billed=1, input_tokens=in_tok, output_tokens=self.output_tokens,
                                  cost_usd=cost)
            self.stats.record(verdict)
            out.append(verdict)
        return out
