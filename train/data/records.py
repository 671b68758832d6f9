"""Parsing of delimited and JSON-lines records, shared by the GLUE, table and tweet readers.

Every problem is a :class:`~train.data.tasks.DataError` naming the file and the 1-based line.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from train.data.tasks import DataError, Example, TaskSpec


class _Record(NamedTuple):
    """One parsed row before its label is converted: the line it starts on, its texts, its raw label."""

    line: int
    texts: tuple[str, ...]
    label: str


def _error(path: Path, line: int, message: str) -> DataError:
    """A :class:`DataError` that names the file and the line."""
    return DataError(f"{path}, line {line}: {message}")


def _require_file(path: Path) -> None:
    """Raise a :class:`DataError` naming ``path`` when it is not an existing file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")


def _numbered_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, line)``, lines split at ``\\n``; a decoding error names its line.

    Each line is decoded on its own (an incremental decoder, so a byte-order mark is dropped only at
    the start) because a text-mode file decodes in chunks and cannot say which line a bad byte is on.
    Only ``\\n`` ends a line, so a bare ``\\r`` inside a quoted CSV field stays part of its field, and
    line numbers agree with ``sed -n <line>p``.
    """
    decoder = codecs.getincrementaldecoder(encoding)()
    name = encoding.removesuffix("-sig").upper()
    line_number = 0
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                yield line_number, decoder.decode(raw)
            except UnicodeDecodeError as exc:
                raise _error(
                    path, line_number, f"not valid {name} text ({exc.reason} at byte {exc.start + 1})"
                ) from None
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise _error(
            path, line_number, f"not valid {name} text (the file ends inside a character: {exc.reason})"
        ) from None


def _csv_rows(path: Path, delimiter: str, quoting: int, encoding: str) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line the record starts on, fields)`` for each non-empty record of a delimited file."""
    lines = (line for _, line in _numbered_lines(path, encoding))
    # strict: an unclosed quote is an error instead of a field that swallows the rest of the file.
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting, strict=True)
    while True:
        # A quoted CSV field may span lines, so a record starts one line after the previous record ended.
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            spans = (
                f"; the record runs on to line {reader.line_num}: is a quote left open?"
                if reader.line_num > start
                else ""
            )
            raise _error(path, start, f"malformed record ({exc}{spans})") from None
        if row:  # an empty line is not a record
            yield start, row


def _text_field(path: Path, line: int, value: str, column: str) -> str:
    """``value`` stripped; an empty text is an error (it would train on nothing but special tokens)."""
    text = value.strip()
    if not text:
        raise _error(path, line, f"empty text in column {column!r}")
    return text


def _header_indices(path: Path, line: int, header: list[str], columns: Sequence[str]) -> tuple[int, ...]:
    """0-based indices of ``columns`` in ``header``; a missing column is an error listing the header."""
    names = [name.strip() for name in header]
    missing = [column for column in columns if column not in names]
    if missing:
        raise _error(path, line, f"missing column(s) {missing}; the header has columns {names}")
    return tuple(names.index(column) for column in columns)


def _row_record(
    path: Path, line: int, row: list[str], text_columns: Sequence[str], indices: Sequence[int], separator: str
) -> _Record:
    """A :class:`_Record` from one delimited row; ``indices`` are the text columns' then the label's."""
    needed = max(indices) + 1
    if len(row) < needed:
        raise _error(path, line, f"expected at least {needed} {separator}-separated fields, found {len(row)}")
    *text_indices, label_index = indices
    texts = tuple(_text_field(path, line, row[i], name) for i, name in zip(text_indices, text_columns, strict=True))
    return _Record(line, texts, row[label_index].strip())


def _delimited_records(
    path: Path,
    *,
    delimiter: str,
    quoting: int,
    encoding: str,
    text_columns: Sequence[str],
    label_column: str,
    indices: Sequence[int] | None = None,
) -> list[_Record]:
    """Records of a delimited file: by header names, or by fixed ``indices`` (text columns, then label) if given."""
    _require_file(path)
    separator = "tab" if delimiter == "\t" else "comma" if delimiter == "," else repr(delimiter)
    rows = _csv_rows(path, delimiter, quoting, encoding)
    has_header = indices is None
    if has_header:
        first = next(rows, None)
        if first is None:
            raise DataError(f"{path}: no data rows (the file is empty, not even a header)")
        header_line, header = first
        indices = _header_indices(path, header_line, header, (*text_columns, label_column))
    records = [_row_record(path, line, row, text_columns, indices, separator) for line, row in rows]
    if not records:
        raise DataError(f"{path}: no data rows" + (" after the header" if has_header else ""))
    return records


def _json_type(value: object) -> str:
    """The JSON name of ``value``'s type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _json_text(path: Path, line: int, value: object, key: str) -> str:
    """A text value of a JSON object: must be a non-empty string."""
    if not isinstance(value, str):
        raise _error(path, line, f"text in key {key!r} must be a string, found {_json_type(value)}")
    return _text_field(path, line, value, key)


def _json_label(path: Path, line: int, value: object, key: str) -> str:
    """A label value of a JSON object as a string; numbers and booleans keep their JSON spelling (``1``, ``true``)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    raise _error(path, line, f"label in key {key!r} must be a string, number or boolean, found {_json_type(value)}")


def _jsonl_record(path: Path, line: int, text: str, text_columns: Sequence[str], label_column: str) -> _Record:
    """A :class:`_Record` from one JSON-lines line holding an object."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(path, line, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise _error(path, line, f"expected a JSON object, found {_json_type(obj)}")
    missing = [key for key in (*text_columns, label_column) if key not in obj]
    if missing:
        raise _error(path, line, f"missing key(s) {missing}; the object has keys {list(obj)}")
    texts = tuple(_json_text(path, line, obj[key], key) for key in text_columns)
    return _Record(line, texts, _json_label(path, line, obj[label_column], label_column))


def _jsonl_records(path: Path, text_columns: Sequence[str], label_column: str) -> list[_Record]:
    """Records of a JSON-lines file (one object per line; blank lines are skipped)."""
    _require_file(path)
    records = [
        _jsonl_record(path, line, text, text_columns, label_column)
        for line, text in _numbered_lines(path, "utf-8-sig")
        if text.strip()
    ]
    if not records:
        raise DataError(f"{path}: no data rows (no JSON objects)")
    return records


def _class_ids(path: Path, records: Iterable[_Record], label_names: Sequence[str], column: str) -> list[int]:
    """Class id of each record's label, by position in ``label_names``; an unknown label is an error."""
    mapping = {name: i for i, name in enumerate(label_names)}
    ids = []
    for record in records:
        if not record.label:
            raise _error(path, record.line, f"empty label in column {column!r}")
        if record.label not in mapping:
            raise _error(
                path,
                record.line,
                f"unknown label {record.label!r} in column {column!r}; known labels: {list(label_names)}",
            )
        ids.append(mapping[record.label])
    return ids


def _score(path: Path, line: int, raw: str, column: str) -> float:
    """A regression label as a finite float."""
    try:
        value = float(raw)
    except ValueError:
        raise _error(path, line, f"score {raw!r} in column {column!r} is not a number") from None
    if not math.isfinite(value):
        raise _error(path, line, f"score {raw!r} in column {column!r} is not a finite number")
    return value


def _examples(records: Sequence[_Record], labels: Sequence[int | float]) -> list[Example]:
    """Pair records with converted labels."""
    return [
        Example(record.texts[0], record.texts[1] if len(record.texts) > 1 else None, label)
        for record, label in zip(records, labels, strict=True)
    ]


def _labelled_examples(path: Path, records: Sequence[_Record], task: TaskSpec) -> list[Example]:
    """Examples with labels converted as ``task`` says (class ids or float scores)."""
    if task.is_regression:
        labels: list[int | float] = [_score(path, r.line, r.label, task.label_column) for r in records]
    else:
        labels = list(_class_ids(path, records, task.label_names, task.label_column))
    return _examples(records, labels)
