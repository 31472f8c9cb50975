"""Record-level file access with line numbers, so every error can name ``file:line``."""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

BUNDLED_PREFIX = "bundled:"


class DataFormatError(ValueError):
    """A record that cannot be read; the message names the file, the line and the field."""

    def __init__(self, path: str | Path, line: int | None, message: str, field: str | None = None,
                 row: int | None = None):
        self.path, self.line, self.field, self.row = str(path), line, field, row
        where = f"{path}:{line}" if line is not None else f"{path}: row {row}" if row is not None else str(path)
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


def resolve_path(path: str | Path) -> Path:
    """Resolves ``bundled:<relative path>`` to the data shipped with the package; other paths as given."""
    text = str(path)
    if text.startswith(BUNDLED_PREFIX):
        rel = text[len(BUNDLED_PREFIX) :].lstrip("/")
        resolved = Path(str(resources.files("lit_route.data") / "bundled" / rel))
        if not resolved.exists():
            raise FileNotFoundError(f"{text}: no such bundled file (looked at {resolved})")
        return resolved
    resolved = Path(text).expanduser()
    if not resolved.exists():
        folder = Path(text.rsplit("#", 1)[0]).expanduser()
        if "#" in text and folder.is_dir():  # `<dataset folder>#<split>`
            return resolved
        raise FileNotFoundError(f"{text}: no such file")
    return resolved


def read_text(path: Path) -> str:
    """The file's text (gunzipped when ``.gz``), with decompression and UTF-8 errors naming the file and line."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (EOFError, OSError, zlib.error) as err:
        raise DataFormatError(path, None, f"cannot decompress ({err}); is the file truncated?") from err
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataFormatError(path, line, f"invalid UTF-8 at byte {err.start}") from err


def lone_surrogate(value: object, field: str = "") -> str | None:
    """The field path (``prompt[0].content``) of the first string holding a lone UTF-16 surrogate, else ``None``.

    JSON allows escapes such as ``"\\ud800"`` that decode to no character at all; such a string cannot be encoded
    as UTF-8, so it would fail much later (tokenising, hashing, writing results). Readers reject it up front.
    """
    if isinstance(value, str):
        return (field or "(value)") if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate(item, f"{field}.{key}" if field else str(key))
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = lone_surrogate(item, f"{field}[{i}]")
            if found:
                return found
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATE_MESSAGE = "lone UTF-16 surrogate (an escape such as \\ud800 that is not a character)"


def check_record(path: Path, line: int | None, record: object) -> None:
    """Raises :class:`DataFormatError` naming the field when ``record`` holds a lone surrogate."""
    field = lone_surrogate(record)
    if field:
        raise DataFormatError(path, line, SURROGATE_MESSAGE, field)


def iter_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yields ``(line, record)`` from a JSON Lines file or a JSON array (optionally gzipped).

    For a JSON array the line is where the element starts. Blank JSONL lines are ignored (they hold no record).
    Lines are split at ``\\n`` only: U+2028 and friends are legal inside JSON strings.

    Raises:
        DataFormatError: malformed JSON, invalid UTF-8, a lone surrogate or a truncated gzip stream, with the
            line (and the field, for a surrogate).
    """
    path = Path(path)
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        for line, record in iter_json_array(path, text):
            check_record(path, line, record)
            yield line, record
        return
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, number, f"invalid JSON ({err.msg} at column {err.colno})") from err
        check_record(path, number, record)
        yield number, record


def iter_json_array(path: Path, text: str) -> Iterator[tuple[int, object]]:
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    while True:
        start = pos
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", start, pos)
        if pos >= len(text):
            raise DataFormatError(path, line, "unterminated JSON array; is the file truncated?")
        if text[pos] == "]":
            return
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, err.lineno, f"invalid JSON ({err.msg} at column {err.colno})") from err
        yield line, record
        line += text.count("\n", pos, end)
        pos = end
