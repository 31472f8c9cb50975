"""Readers that turn each public preference format into :class:`PreferencePair` records.

Every reader validates each record and raises :class:`DataFormatError` naming ``file:line`` and the field.
With ``skip_invalid=True`` a bad record is skipped instead, and counted in the :class:`ReadReport`;
nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lit_route.data.io import DataFormatError, iter_records, read_text, resolve_path
from lit_route.types import PreferencePair

log = logging.getLogger(__name__)

Reader = Callable[[Path, int, dict], list[PreferencePair]]


@dataclass
class ReadReport:
    """What :func:`load_pairs` read: pairs per file, and every skipped record with its reason."""

    pairs_per_file: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _text(path: Path, line: int, record: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in record:
        raise DataFormatError(path, line, "missing", key)
    value = record[key]
    if not isinstance(value, str):
        raise DataFormatError(path, line, f"expected a string, got {type(value).__name__}", key)
    if not allow_empty and not value.strip():
        raise DataFormatError(path, line, "empty string", key)
    return value


def _messages(path: Path, line: int, value: object, key: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataFormatError(path, line, "expected a non-empty list of {role, content} messages", key)
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(
            msg.get("content"), str
        ):
            raise DataFormatError(path, line, f"message {i} must have string 'role' and 'content'", key)
        out.append({"role": msg["role"], "content": msg["content"]})
    return tuple(out)


def _prompt(path: Path, line: int, record: dict, key: str = "prompt"):
    if key not in record:
        raise DataFormatError(path, line, "missing", key)
    if isinstance(record[key], list):
        return _messages(path, line, record[key], key)
    return _text(path, line, record, key)


def _strength(path: Path, line: int, record: dict) -> float | None:
    value = record.get("strength", record.get("margin"))
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise DataFormatError(path, line, "expected a non-negative number", "strength")
    return float(value)


def read_generic(path: Path, line: int, record: dict) -> list[PreferencePair]:
    """``{"prompt": str | messages, "chosen": str, "rejected": str, ["id", "subset", "strength"]}``."""
    return [
        PreferencePair(
            prompt=_prompt(path, line, record),
            chosen=_text(path, line, record, "chosen"),
            rejected=_text(path, line, record, "rejected"),
            subset=str(record.get("subset", "")),
            id=str(record.get("id", f"{path.stem}:{line}")),
            strength=_strength(path, line, record),
        )
    ]


def read_rewardbench(path: Path, line: int, record: dict) -> list[PreferencePair]:
    """RewardBench schema: ``{"id", "subset", "prompt", "chosen", "rejected", ...}`` (ids and subsets required)."""
    for key in ("id", "subset"):
        if key not in record:
            raise DataFormatError(path, line, "missing", key)
    return read_generic(path, line, record)


# RM-Bench's 3x3 matrix: rows are the chosen style, columns the rejected style (concise, detailed plain,
# detailed markdown). Above the diagonal the chosen answer is plainer than the rejected one: "hard".
_RMBENCH_LEVEL = {(i, j): ("hard" if i < j else "normal" if i == j else "easy") for i in range(3) for j in range(3)}


def read_rmbench(path: Path, line: int, record: dict) -> list[PreferencePair]:
    """RM-Bench: each prompt expands into its 9 style comparisons, subset ``<domain>/<hard|normal|easy>``."""
    prompt = _text(path, line, record, "prompt")
    styles = {}
    for key in ("chosen", "rejected"):
        value = record.get(key)
        if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, str) and v.strip() for v in value):
            raise DataFormatError(path, line, "expected a list of 3 non-empty strings (one per style)", key)
        styles[key] = value
    domain = str(record.get("subset", path.stem.replace("_filtered", "")))
    rid = str(record.get("id", line))
    return [
        PreferencePair(
            prompt=prompt,
            chosen=styles["chosen"][i],
            rejected=styles["rejected"][j],
            subset=f"{domain}/{_RMBENCH_LEVEL[i, j]}",
            id=f"{rid}:{i}{j}",
        )
        for i in range(3)
        for j in range(3)
    ]


def read_llmbar(path: Path, line: int, record: dict) -> list[PreferencePair]:
    """LLMBar: ``{"input", "output_1", "output_2", "label": 1 | 2}``; the subset is the file name."""
    prompt = _text(path, line, record, "input")
    outputs = [_text(path, line, record, "output_1"), _text(path, line, record, "output_2")]
    label = record.get("label")
    if label not in (1, 2) or isinstance(label, bool):
        raise DataFormatError(path, line, f"expected 1 or 2, got {label!r}", "label")
    return [
        PreferencePair(
            prompt=prompt,
            chosen=outputs[label - 1],
            rejected=outputs[2 - label],
            subset=path.stem,
            id=f"{path.stem}:{line}",
        )
    ]


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """Splits an HH-RLHF dialogue string (``\\n\\nHuman: ...\\n\\nAssistant: ...``) into chat messages."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("expected a dialogue starting with '\\n\\nHuman: '")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]


def read_hh(path: Path, line: int, record: dict) -> list[PreferencePair]:
    """HH-RLHF: whole dialogues; the shared turns are the context, the differing final Assistant turn the response."""
    turns = {}
    for key in ("chosen", "rejected"):
        try:
            turns[key] = parse_hh_dialogue(_text(path, line, record, key))
        except ValueError as err:
            raise DataFormatError(path, line, str(err), key) from err
        if turns[key][-1]["role"] != "assistant":
            raise DataFormatError(path, line, "the dialogue must end with an Assistant turn", key)
    context = turns["chosen"][:-1]
    if context != turns["rejected"][:-1]:
        raise DataFormatError(path, line, "chosen and rejected differ before their final Assistant turn", "rejected")
    chosen, rejected = turns["chosen"][-1]["content"], turns["rejected"][-1]["content"]
    if not chosen.strip() or not rejected.strip():
        raise DataFormatError(path, line, "empty final Assistant turn", "chosen" if not chosen.strip() else "rejected")
    return [
        PreferencePair(
            prompt=tuple(context), chosen=chosen, rejected=rejected, subset=path.name.split(".")[0],
            id=str(record.get("id", f"{path.name.split('.')[0]}:{line}")),
        )
    ]


def read_rmb(path: Path, line: int, record: dict) -> list[PreferencePair]:
    """RMB pairwise records: ``{"pair_uid", "conversation_input", "chosen": {"answer"}, "reject": {"answer"}, ...}``."""
    context = _messages(path, line, record.get("conversation_input"), "conversation_input")
    answers = {}
    for key in ("chosen", "reject"):
        value = record.get(key)
        if not isinstance(value, dict):
            raise DataFormatError(path, line, "expected an object with an 'answer'", key)
        answers[key] = _text(path, line, value, "answer")
    return [
        PreferencePair(
            prompt=context, chosen=answers["chosen"], rejected=answers["reject"],
            subset=str(record.get("category_path", "")), id=str(record.get("pair_uid", line)),
        )
    ]


FORMATS: dict[str, Reader] = {
    "generic": read_generic,
    "rewardbench": read_rewardbench,
    "rmbench": read_rmbench,
    "llmbar": read_llmbar,
    "hh": read_hh,
    "rmb": read_rmb,
}


def detect_format(record: object) -> str:
    """Guesses a record's format from its keys (``format: auto``)."""
    if not isinstance(record, dict):
        return "generic"
    keys = set(record)
    if {"input", "output_1", "output_2", "label"} <= keys:
        return "llmbar"
    if "conversation_input" in keys:
        return "rmb"
    if isinstance(record.get("chosen"), list) and "prompt" in keys:
        return "rmbench"
    if "prompt" not in keys and isinstance(record.get("chosen"), str) and record["chosen"].startswith("\n\nHuman:"):
        return "hh"
    if {"id", "subset", "prompt", "chosen", "rejected"} <= keys:
        return "rewardbench"
    return "generic"


def load_pairs(
    paths: str | Path | Sequence[str | Path],
    format: str = "auto",
    skip_invalid: bool = False,
    limit: int | None = None,
    report: ReadReport | None = None,
) -> list[PreferencePair]:
    """Reads preference pairs from one or more files.

    Args:
        paths: JSONL / JSON-array files, optionally ``.gz``; ``bundled:<path>`` names the data shipped with
            the package.
        format: One of ``auto``, ``generic``, ``rewardbench``, ``rmbench``, ``llmbar``, ``hh``, ``rmb``.
        skip_invalid: Skip (and count) malformed records instead of raising.
        limit: Keep at most this many pairs per file (the first ones).
        report: Filled with per-file counts and the skipped records.

    Raises:
        DataFormatError: a malformed record (unless ``skip_invalid``), a duplicate id, or an empty file.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format: unknown '{format}'; choose one of auto, {', '.join(FORMATS)}")
    report = report if report is not None else ReadReport()
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    out: list[PreferencePair] = []
    for raw_path in paths:
        path = resolve_path(raw_path)
        pairs = _read_file(path, format, skip_invalid, limit, report)
        if not pairs:
            raise DataFormatError(path, None, "no preference pairs in this file")
        report.pairs_per_file[str(raw_path)] = len(pairs)
        out.extend(pairs)
    if report.skipped:
        log.warning("skipped %d invalid records (skip_invalid=True); first: %s", len(report.skipped), report.skipped[0])
    return out


def _read_file(path: Path, format: str, skip_invalid: bool, limit: int | None, report: ReadReport):
    pairs: list[PreferencePair] = []
    seen: dict[str, int] = {}
    reader: Reader | None = None if format == "auto" else FORMATS[format]
    for line, record in _records(path, skip_invalid, report):
        if reader is None:
            reader = FORMATS[detect_format(record)]
        try:
            if not isinstance(record, dict):
                raise DataFormatError(path, line, f"expected a JSON object, got {type(record).__name__}")
            new = reader(path, line, record)
            for pair in new:
                if pair.id in seen:
                    raise DataFormatError(path, line, f"duplicate id {pair.id!r} (first on line {seen[pair.id]})", "id")
                seen[pair.id] = line
        except DataFormatError as err:
            if not skip_invalid:
                raise
            report.skipped.append(str(err))
            continue
        pairs.extend(new)
        if limit is not None and len(pairs) >= limit:
            return pairs[:limit]
    return pairs


def _records(path: Path, skip_invalid: bool, report: ReadReport) -> Iterable[tuple[int, object]]:
    # A JSON syntax error ends the file for the parser; with skip_invalid the rest of a JSONL file is still read.
    if skip_invalid and not path.name.endswith((".json", ".json.gz")):
        yield from _records_lenient(path, report)
    else:
        yield from iter_records(path)


def _records_lenient(path: Path, report: ReadReport) -> Iterable[tuple[int, object]]:
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            report.skipped.append(str(DataFormatError(path, number, f"invalid JSON ({err.msg})")))
