"""Record-level file access with line numbers, so every error can name ``file:line``."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

BUNDLED_PREFIX = "bundled:"


class DataFormatError(ValueError):
    """A record that cannot be read; the message names the file, the line and the field."""

    def __init__(self, path: str | Path, line: int | None, message: str, field: str | None = None):
        self.path, self.line, self.field = str(path), line, field
        where = f"{path}:{line}" if line is not None else str(path)
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


def iter_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yields ``(line, record)`` from a JSON Lines file or a JSON array (optionally gzipped).

    For a JSON array the line is where the element starts. Blank JSONL lines are ignored (they hold no record).

    Raises:
        DataFormatError: malformed JSON, invalid UTF-8 or a truncated gzip stream, with the line.
    """
    path = Path(path)
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _iter_json_array(path, text)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, number, f"invalid JSON ({err.msg} at column {err.colno})") from err


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, object]]:
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
