"""Reading a data file into a ``datasets.Dataset`` of raw records, or record by record where Arrow cannot."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lit_route.data.io import DataFormatError, iter_json_array, read_text

log = logging.getLogger(__name__)

_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


@dataclass(frozen=True)
class InvalidRecord:
    """A JSON Lines line that does not parse; it becomes a skippable error of its own line."""

    message: str


@contextlib.contextmanager
def quiet_datasets():
    """No progress bars or logs from ``datasets`` while loading and mapping (both restored afterwards).

    Its log would report a JSON file that Arrow cannot read as an error, where the reader then reads that file
    record by record and reports, by line, what is wrong with it.
    """
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    logger = logging.getLogger("datasets")
    level = logger.level
    disable_progress_bars()
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
        if not was_disabled:
            enable_progress_bars()


def strip_nulls(record: dict) -> dict:
    """Arrow gives every row every column; a null stands for a key the record did not have."""
    return {k: v for k, v in record.items() if v is not None}


def split_spec(path: str | Path) -> tuple[Path, str | None]:
    """``folder#split`` -> ``(folder, split)``."""
    text = str(path)
    if "#" in text and not Path(text).exists():
        folder, split = text.rsplit("#", 1)
        return Path(folder), split
    return Path(text), None


def _pick_split(loaded, path: Path, split: str | None):
    from datasets import DatasetDict

    if not isinstance(loaded, DatasetDict):
        if split is not None:
            raise DataFormatError(path, None, f"split {split!r} asked for, but this folder holds a single dataset")
        return loaded
    name = split or ("train" if "train" in loaded or len(loaded) != 1 else next(iter(loaded)))
    if name not in loaded:
        raise DataFormatError(path, None, f"no split {name!r}; it has {sorted(loaded)} (pick one with '{path}#<split>')")
    return loaded[name]


def read_table(path: str | Path):
    """Reads a data file or dataset folder.

    Returns:
        ``(table, lines, records)``: ``table`` is a ``datasets.Dataset`` of the raw records (``None`` when the
        file had to be read record by record), ``lines`` the line of each row for text files (``None`` for
        parquet and folders), and ``records`` the ``(line, record)`` list of a file read record by record (an
        unparseable JSON Lines line is an :class:`InvalidRecord`).
    """
    import datasets

    path, split = split_spec(path)
    with quiet_datasets():
        if path.is_dir():
            if any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
                return _pick_split(datasets.load_from_disk(str(path)), path, split), None, None
            return datasets.load_dataset(str(path), split=split or "train"), None, None
        if path.name.endswith(".parquet"):
            return datasets.load_dataset("parquet", data_files=str(path), split="train"), None, None
        if not path.name.endswith(_JSON_SUFFIXES):
            raise DataFormatError(path, None, "unknown file type; expected .json, .jsonl (optionally .gz), .parquet "
                                              "or a dataset folder")
        text = read_text(path)
        if not text.strip():  # `datasets` fails on an empty file with a bare StopIteration; the caller names it
            return None, None, []
        if text.lstrip().startswith("["):
            # a JSON array is parsed whole by either reader; Python's keeps every string as written (the Arrow
            # path of `datasets` silently drops a lone surrogate from a JSON array) and knows each record's line
            return None, None, _records(path, text)
        try:
            table = datasets.load_dataset("json", data_files=str(path), split="train")
        except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
            # mixed types, a syntax error or a lone surrogate: read it record by record, so the error (or,
            # with skip_invalid, the skipped record) is named by its line
            log.debug("%s: not one Arrow table (%s); reading record by record", path, err)
            return None, None, _records(path, text)
    lines = record_lines(text)
    if len(lines) != len(table):  # Arrow and the line reader disagree on what a record is: trust the latter
        return None, None, _records(path, text)
    return table, lines, None


def record_lines(text: str) -> list[int]:
    """The line of each record of a JSON Lines text (blank lines hold none)."""
    return [number for number, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _records(path: Path, text: str) -> list[tuple[int, object]]:
    if text.lstrip().startswith("["):  # a syntax error ends a JSON array: nothing after it can be trusted
        return list(iter_json_array(path, text))
    out: list[tuple[int, object]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            out.append((number, InvalidRecord(f"invalid JSON ({err.msg} at column {err.colno})")))
    return out
