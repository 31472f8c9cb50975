"""Loading preference pairs through Hugging Face ``datasets``: files and saved datasets in, pairs out.

A data file is read into a ``datasets.Dataset`` (JSON / JSON Lines, optionally gzipped, parquet, a folder saved
with ``save_to_disk`` or a folder of data files), then each record is mapped to pairs by its format's adapter
(:mod:`lit_route.data.adapters`) with ``Dataset.map``, whose results ``datasets`` caches beside the table: a
second run over the same file reads the pairs from the cache.

Every record is validated. A malformed one raises :class:`DataFormatError` naming ``file:line`` (the row for
tables) and the field; with ``skip_invalid=True`` it is skipped instead and counted in the :class:`ReadReport`.
Nothing is dropped silently. A JSON file that Arrow cannot read as one table (mixed types, invalid JSON or
UTF-8, lone surrogates) is read record by record instead, so that its errors still name their line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lit_route.data.adapters import FORMATS, RecordError, Source, detect_format
from lit_route.data.io import SURROGATE_MESSAGE, DataFormatError, lone_surrogate, resolve_path
from lit_route.data.tables import InvalidRecord, quiet_datasets, read_table, strip_nulls
from lit_route.types import PreferencePair

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "ReadReport", "detect_format", "load_pair_dataset", "load_pairs", "pairs_from_dataset"]


@dataclass
class ReadReport:
    """What :func:`load_pairs` read: pairs per file, and every skipped record with its reason."""

    pairs_per_file: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def pair_features():
    """The columns of a pair table: one row per pair (or per rejected record, with ``error`` set)."""
    from datasets import Features, List, Value

    message = {"role": Value("string"), "content": Value("string")}
    return Features({
        "prompt": Value("string"),  # the prompt as text, or null when it is a conversation
        "prompt_messages": List(message),  # the prompt as a conversation, or null
        "chosen": Value("string"),
        "rejected": Value("string"),
        "subset": Value("string"),
        "id": Value("string"),
        "strength": Value("float64"),
        "line": Value("int64"),  # where the record starts in a text file (null for tables)
        "row": Value("int64"),  # the record's row
        "error": Value("string"),
        "error_field": Value("string"),
    })


class PairMapper:
    """``Dataset.map`` function (batched, with indices): raw records -> pair rows.

    A record may hold several pairs (RM-Bench: 9); a record that does not fit its format becomes one row with
    ``error`` set, so that the cached result serves both strict and lenient reading.

    Args:
        path: The file (for default ids and subsets).
        format: An adapter name from :data:`FORMATS`.
        lines: Line of each row for text files; ``None`` for tables (ids and errors then use the row).
    """

    def __init__(self, path: str, format: str, lines: list[int] | None = None):
        self.path, self.format, self.lines = path, format, lines

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        columns = list(batch)
        records = [strip_nulls({c: batch[c][i] for c in columns}) for i in range(len(indices))]
        return self.map_records(records, indices)

    def map_records(self, records: list, rows: list[int]) -> dict[str, list]:
        adapter = FORMATS[self.format]
        out: dict[str, list] = {name: [] for name in pair_features()}
        for record, row in zip(records, rows, strict=True):
            line = self.lines[row] if self.lines is not None else None
            try:
                if isinstance(record, InvalidRecord):
                    raise RecordError(record.message)
                if not isinstance(record, dict):
                    raise RecordError(f"expected a JSON object, got {type(record).__name__}")
                bad = lone_surrogate(record)
                if bad:
                    raise RecordError(SURROGATE_MESSAGE, bad)
                pairs = adapter(record, Source(self.path, line if line is not None else row))
            except RecordError as err:
                _append(out, None, line, row, err.message, err.field)
                continue
            for pair in pairs:
                _append(out, pair, line, row, None, None)
        return out


def _append(out: dict[str, list], pair: PreferencePair | None, line, row, error, error_field) -> None:
    text = pair is not None and isinstance(pair.prompt, str)
    out["prompt"].append(pair.prompt if text else None)
    out["prompt_messages"].append(list(pair.prompt) if pair is not None and not text else None)
    for key in ("chosen", "rejected", "subset", "id", "strength"):
        out[key].append(getattr(pair, key) if pair is not None else None)
    out["line"].append(line)
    out["row"].append(row)
    out["error"].append(error)
    out["error_field"].append(error_field)


def read_pair_table(path: Path, format: str = "auto", limit_rows: int | None = None):
    """One file's pair rows, error rows included (see :class:`PairMapper`).

    Returns:
        ``(pairs, truncated)``: the pair table and whether ``limit_rows`` left records unread.
    """
    from datasets import Dataset

    table, lines, records = read_table(path)
    if records is not None:
        candidates = (r for _, r in records)
    else:
        candidates = (strip_nulls(table[i]) for i in range(min(len(table), 100)))
    first = next((r for r in candidates if isinstance(r, dict)), None)
    if first is None and not (records or (table is not None and len(table))):
        raise DataFormatError(path, None, "no preference pairs in this file")
    fmt = detect_format(first) if format == "auto" else format
    if records is not None:  # read record by record: Arrow could not make one table of them
        truncated = limit_rows is not None and limit_rows < len(records)
        records = records[:limit_rows] if truncated else records
        mapper = PairMapper(str(path), fmt, [line for line, _ in records])
        columns = mapper.map_records([r for _, r in records], list(range(len(records))))
        return Dataset.from_dict(columns, features=pair_features()), truncated
    truncated = limit_rows is not None and limit_rows < len(table)
    if truncated:
        table = table.select(range(limit_rows))
    with quiet_datasets():
        pairs = table.map(PairMapper(str(path), fmt, lines), batched=True, with_indices=True,
                          remove_columns=table.column_names, features=pair_features())
    return pairs, truncated


def _error(path: Path, line, row, message: str, field_name) -> DataFormatError:
    return DataFormatError(path, line, message, field_name, row=row if line is None else None)


def _check_file(path: Path, table, skip_invalid: bool, report: ReadReport, limit: int | None = None):
    """Raises (or, with ``skip_invalid``, records) error rows and duplicate ids up to the ``limit``-th good pair;
    returns the good rows."""
    keep, seen = [], {}
    cols = table.select_columns(["line", "row", "id", "error", "error_field"]).to_dict()
    lines, rows, ids, errors = cols["line"], cols["row"], cols["id"], cols["error"]
    for i, message in enumerate(errors):
        if limit is not None and len(keep) >= limit:
            break
        err = None
        if message is not None:
            err = _error(path, lines[i], rows[i], message, cols["error_field"][i])
        elif ids[i] in seen:
            line, row = seen[ids[i]]
            where = f"line {line}" if line is not None else f"row {row}"
            err = _error(path, lines[i], rows[i], f"duplicate id {ids[i]!r} (first on {where})", "id")
        if err is not None:
            if not skip_invalid:
                raise err
            report.skipped.append(str(err))
            continue
        seen[ids[i]] = (lines[i], rows[i])
        keep.append(i)
    return table if len(keep) == len(table) else table.select(keep)


def load_pair_dataset(
    paths: str | Path | Sequence[str | Path],
    format: str = "auto",
    skip_invalid: bool = False,
    limit: int | None = None,
    report: ReadReport | None = None,
):
    """Reads preference pairs from one or more files into one ``datasets.Dataset`` (see :func:`pair_features`).

    Args:
        paths: JSON / JSON Lines files (optionally ``.gz``), parquet files, folders written by
            ``Dataset.save_to_disk`` or holding data files (``<folder>#<split>`` picks a split, default
            ``train``); ``bundled:<path>`` names the data shipped with the package.
        format: ``auto`` (detected per file from its first record) or one of :data:`FORMATS`.
        skip_invalid: Skip (and count) malformed records instead of raising.
        limit: Keep at most this many pairs per file (the first ones).
        report: Filled with per-file counts and the skipped records.

    Raises:
        DataFormatError: a malformed record (unless ``skip_invalid``), a duplicate id, or an empty file.
    """
    from datasets import concatenate_datasets

    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format: unknown '{format}'; choose one of auto, {', '.join(FORMATS)}")
    report = report if report is not None else ReadReport()
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    tables, bundled_skips = [], []
    for raw_path in paths:
        path = resolve_path(raw_path)
        # every record holds at least one pair: the first `limit` records are enough, unless some are skipped
        file_report = ReadReport()
        table, truncated = read_pair_table(path, format, limit)
        good = _check_file(path, table, skip_invalid, file_report, limit)
        if truncated and len(good) < limit:
            file_report = ReadReport()
            good = _check_file(path, read_pair_table(path, format)[0], skip_invalid, file_report, limit)
        if not len(good):
            raise DataFormatError(path, None, "no preference pairs in this file")
        report.skipped.extend(file_report.skipped)
        if str(raw_path).startswith("bundled:"):
            bundled_skips.extend(file_report.skipped)
        report.pairs_per_file[str(raw_path)] = len(good)
        tables.append(good)
    # the bundled files' few empty records are known and the same on every run: said once at INFO, not warned
    theirs = [s for s in report.skipped if s not in bundled_skips]
    if theirs:
        log.warning("skipped %d invalid records (skip_invalid=True); first: %s", len(theirs), theirs[0])
    if bundled_skips:
        log.info("skipped %d invalid records of bundled data; first: %s", len(bundled_skips), bundled_skips[0])
    return tables[0] if len(tables) == 1 else concatenate_datasets(tables)


_PAIR_FIELDS = ["prompt", "prompt_messages", "chosen", "rejected", "subset", "id", "strength"]


def pairs_from_dataset(dataset) -> list[PreferencePair]:
    """The rows of a pair table (a ``datasets.Dataset`` or a batch of its columns) as :class:`PreferencePair`."""
    if not hasattr(dataset, "select_columns"):  # a batch: a mapping of column lists
        rows = [dict(zip(_PAIR_FIELDS, values, strict=True)) for values in zip(*(dataset[k] for k in _PAIR_FIELDS), strict=True)]
    else:
        rows = dataset.select_columns(_PAIR_FIELDS).to_list()
    out = []
    for row in rows:
        prompt = row["prompt"] if row["prompt"] is not None else tuple(
            {"role": m["role"], "content": m["content"]} for m in row["prompt_messages"])
        out.append(PreferencePair(prompt=prompt, chosen=row["chosen"], rejected=row["rejected"], subset=row["subset"],
                                  id=row["id"], strength=row["strength"]))
    return out


def load_pairs(
    paths: str | Path | Sequence[str | Path],
    format: str = "auto",
    skip_invalid: bool = False,
    limit: int | None = None,
    report: ReadReport | None = None,
) -> list[PreferencePair]:
    """Reads preference pairs from one or more files; the arguments are those of :func:`load_pair_dataset`."""
    return pairs_from_dataset(load_pair_dataset(paths, format, skip_invalid, limit, report))
