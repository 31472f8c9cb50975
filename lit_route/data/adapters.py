"""Mapping functions from each public preference format to :class:`PreferencePair`.

Each adapter takes one record (a dict) and where it came from, and returns the pairs it holds, or raises
:class:`RecordError` naming the field. The loaders (:mod:`lit_route.data.readers`) run them through
``datasets.Dataset.map`` and turn a ``RecordError`` into a ``file:line: field: what`` message.

Formats:

- ``trl``: TRL's preference layouts, explicit prompt (``{"prompt", "chosen", "rejected"}``) or implicit prompt
  (``{"chosen", "rejected"}`` only: the shared beginning is the prompt), each as plain text or as chat messages
  (``[{"role", "content"}, ...]``). ``generic`` is the same reader (the name of earlier releases).
- ``rewardbench``: ``{"id", "subset", "prompt", "chosen", "rejected", ...}`` with ids and subsets required.
- ``rmbench``: RM-Bench, each prompt with 3 chosen and 3 rejected styles, expanded into its 9 comparisons.
- ``llmbar``: ``{"input", "output_1", "output_2", "label": 1 | 2}``.
- ``hh``: Anthropic HH-RLHF whole dialogues (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``).
- ``rmb``: RMB pairwise records.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lit_route.types import PreferencePair


class RecordError(ValueError):
    """A record that does not fit its format; ``field`` names the offending key."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field


_DATA_SUFFIXES = (".gz", ".json", ".jsonl", ".parquet", ".arrow")


@dataclass(frozen=True)
class Source:
    """Where a record comes from: its file and its line (text files) or row (tables)."""

    path: str
    index: int

    @property
    def stem(self) -> str:
        """The file name without its data suffixes: ``harmless-base-test.jsonl.gz`` -> ``harmless-base-test``."""
        name = Path(self.path).name
        while name.endswith(_DATA_SUFFIXES):
            name = name.rsplit(".", 1)[0]
        return name

    def default_id(self) -> str:
        return f"{self.stem}:{self.index}"


Adapter = Callable[[dict, Source], list[PreferencePair]]


def _text(record: dict, key: str, *, allow_empty: bool = False) -> str:
    if record.get(key) is None:
        raise RecordError("missing", key)
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"expected a string, got {type(value).__name__}", key)
    if not allow_empty and not value.strip():
        raise RecordError("empty string", key)
    return value


def _messages(value: object, key: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise RecordError("expected a non-empty list of {role, content} messages", key)
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise RecordError(f"message {i} must have string 'role' and 'content'", key)
        out.append({"role": msg["role"], "content": msg["content"]})
    return tuple(out)


def _prompt(record: dict, key: str = "prompt"):
    if isinstance(record.get(key), list):
        return _messages(record[key], key)
    return _text(record, key)


def _strength(record: dict) -> float | None:
    value = record.get("strength", record.get("margin"))
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise RecordError("expected a non-negative number", "strength")
    return float(value)


def _pair(record: dict, src: Source, prompt, chosen: str, rejected: str) -> list[PreferencePair]:
    return [
        PreferencePair(
            prompt=prompt, chosen=chosen, rejected=rejected, subset=str(record.get("subset") or ""),
            id=str(record["id"]) if record.get("id") is not None else src.default_id(), strength=_strength(record),
        )
    ]


def _split_conversations(chosen: tuple, rejected: tuple) -> tuple[tuple, str, str]:
    """Shared leading messages, then the one final assistant message of each side."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if len(side) - shared != 1:
            raise RecordError("chosen and rejected must differ in their final message only", key)
        if side[-1]["role"] != "assistant":
            raise RecordError(f"the final message must be the assistant's, got role {side[-1]['role']!r}", key)
        if not side[-1]["content"].strip():
            raise RecordError("empty final assistant message", key)
    return chosen[:shared], chosen[-1]["content"], rejected[-1]["content"]


def _split_texts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's ``extract_prompt`` for plain text: the common beginning is the prompt."""
    idx = 0
    while idx < min(len(chosen), len(rejected)) and chosen[idx] == rejected[idx]:
        idx += 1
    if idx and chosen[idx - 1] == " ":  # the space before the completion belongs to the completion
        idx -= 1
    if idx == 0:
        raise RecordError("no prompt: the record has no 'prompt' and chosen and rejected share no beginning", "prompt")
    for key, rest in (("chosen", chosen[idx:]), ("rejected", rejected[idx:])):
        if not rest.strip():
            raise RecordError("nothing after the shared prompt", key)
    return chosen[:idx], chosen[idx:], rejected[idx:]


def read_trl(record: dict, src: Source) -> list[PreferencePair]:
    """TRL preference data: explicit or implicit prompt, plain text or conversational."""
    prompt = _prompt(record) if record.get("prompt") is not None else None
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if isinstance(chosen, list) or isinstance(rejected, list):
        context, chosen, rejected = _split_conversations(_messages(chosen, "chosen"), _messages(rejected, "rejected"))
        if prompt is None and not context:
            raise RecordError("no prompt: the record has no 'prompt' and chosen and rejected share no turn", "prompt")
        if prompt is None:
            prompt = context
        elif context:  # turns both completions repeat belong to the context
            prompt = (({"role": "user", "content": prompt},) if isinstance(prompt, str) else prompt) + context
        return _pair(record, src, prompt, chosen, rejected)
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    if prompt is None:
        prompt, chosen, rejected = _split_texts(chosen, rejected)
    return _pair(record, src, prompt, chosen, rejected)


def read_rewardbench(record: dict, src: Source) -> list[PreferencePair]:
    """RewardBench schema: ``{"id", "subset", "prompt", "chosen", "rejected", ...}`` (ids and subsets required)."""
    for key in ("id", "subset"):
        if record.get(key) is None:
            raise RecordError("missing", key)
    return _pair(record, src, _prompt(record), _text(record, "chosen"), _text(record, "rejected"))


# RM-Bench's 3x3 matrix: rows are the chosen style, columns the rejected style (concise, detailed plain,
# detailed markdown). Above the diagonal the chosen answer is plainer than the rejected one: "hard".
_RMBENCH_LEVEL = {(i, j): ("hard" if i < j else "normal" if i == j else "easy") for i in range(3) for j in range(3)}


def read_rmbench(record: dict, src: Source) -> list[PreferencePair]:
    """RM-Bench: each prompt expands into its 9 style comparisons, subset ``<domain>/<hard|normal|easy>``."""
    prompt = _text(record, "prompt")
    styles = {}
    for key in ("chosen", "rejected"):
        value = record.get(key)
        if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, str) and v.strip() for v in value):
            raise RecordError("expected a list of 3 non-empty strings (one per style)", key)
        styles[key] = value
    domain = str(record.get("subset") or src.stem.replace("_filtered", ""))
    rid = str(record["id"]) if record.get("id") is not None else str(src.index)
    return [
        PreferencePair(
            prompt=prompt, chosen=styles["chosen"][i], rejected=styles["rejected"][j],
            subset=f"{domain}/{_RMBENCH_LEVEL[i, j]}", id=f"{rid}:{i}{j}",
        )
        for i in range(3)
        for j in range(3)
    ]


def read_llmbar(record: dict, src: Source) -> list[PreferencePair]:
    """LLMBar: ``{"input", "output_1", "output_2", "label": 1 | 2}``; the subset is the file name."""
    prompt = _text(record, "input")
    outputs = [_text(record, "output_1"), _text(record, "output_2")]
    label = record.get("label")
    if label not in (1, 2) or isinstance(label, bool):
        raise RecordError(f"expected 1 or 2, got {label!r}", "label")
    return [
        PreferencePair(prompt=prompt, chosen=outputs[label - 1], rejected=outputs[2 - label], subset=src.stem,
                       id=src.default_id())
    ]


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """Splits an HH-RLHF dialogue string (``\\n\\nHuman: ...\\n\\nAssistant: ...``) into chat messages."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("expected a dialogue starting with '\\n\\nHuman: '")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]


def read_hh(record: dict, src: Source) -> list[PreferencePair]:
    """HH-RLHF: whole dialogues; the shared turns are the context, the differing final Assistant turn the response."""
    turns = {}
    for key in ("chosen", "rejected"):
        try:
            turns[key] = parse_hh_dialogue(_text(record, key))
        except ValueError as err:
            if isinstance(err, RecordError):
                raise
            raise RecordError(str(err), key) from err
        if turns[key][-1]["role"] != "assistant":
            raise RecordError("the dialogue must end with an Assistant turn", key)
    context = turns["chosen"][:-1]
    if context != turns["rejected"][:-1]:
        raise RecordError("chosen and rejected differ before their final Assistant turn", "rejected")
    chosen, rejected = turns["chosen"][-1]["content"], turns["rejected"][-1]["content"]
    if not chosen.strip() or not rejected.strip():
        raise RecordError("empty final Assistant turn", "chosen" if not chosen.strip() else "rejected")
    rid = str(record["id"]) if record.get("id") is not None else src.default_id()
    return [PreferencePair(prompt=tuple(context), chosen=chosen, rejected=rejected, subset=src.stem, id=rid)]


def read_rmb(record: dict, src: Source) -> list[PreferencePair]:
    """RMB pairwise records: ``{"pair_uid", "conversation_input", "chosen": {"answer"}, "reject": {"answer"}, ...}``."""
    context = _messages(record.get("conversation_input"), "conversation_input")
    answers = {}
    for key in ("chosen", "reject"):
        value = record.get(key)
        if not isinstance(value, dict):
            raise RecordError("expected an object with an 'answer'", key)
        try:
            answers[key] = _text(value, "answer")
        except RecordError as err:
            raise RecordError(err.message, f"{key}.answer") from err
    uid = record.get("pair_uid")
    return [
        PreferencePair(
            prompt=context, chosen=answers["chosen"], rejected=answers["reject"],
            subset=str(record.get("category_path") or ""), id=str(uid) if uid is not None else str(src.index),
        )
    ]


FORMATS: dict[str, Adapter] = {
    "trl": read_trl,
    "generic": read_trl,
    "rewardbench": read_rewardbench,
    "rmbench": read_rmbench,
    "llmbar": read_llmbar,
    "hh": read_hh,
    "rmb": read_rmb,
}


def detect_format(record: object) -> str:
    """Guesses a record's format from its keys and value types (``format: auto``)."""
    if not isinstance(record, dict):
        return "trl"
    keys = {k for k, v in record.items() if v is not None}
    if {"input", "output_1", "output_2", "label"} <= keys:
        return "llmbar"
    if "conversation_input" in keys:
        return "rmb"
    chosen = record.get("chosen")
    if isinstance(chosen, list) and chosen and all(isinstance(c, str) for c in chosen) and "prompt" in keys:
        return "rmbench"  # TRL's conversational completions are lists of messages, RM-Bench's lists of strings
    if "prompt" not in keys and isinstance(chosen, str) and chosen.startswith("\n\nHuman:"):
        return "hh"
    if {"id", "subset", "prompt", "chosen", "rejected"} <= keys and isinstance(chosen, str):
        return "rewardbench"
    return "trl"
