"""A user's CSV, TSV or JSON-lines table with named columns."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from train.data.records import _class_ids, _delimited_records, _examples, _jsonl_records, _score
from train.data.tasks import Example

TableFormat = Literal["csv", "tsv", "jsonl"]

_SUFFIX_FORMATS: dict[str, TableFormat] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def _table_format(path: Path, fmt: str | None) -> TableFormat:
    """``fmt`` if given, else the format named by ``path``'s extension."""
    if fmt is not None:
        if fmt not in ("csv", "tsv", "jsonl"):
            raise ValueError(f"fmt must be 'csv', 'tsv' or 'jsonl', got {fmt!r}")
        return fmt  # type: ignore[return-value]
    found = _SUFFIX_FORMATS.get(path.suffix.lower())
    if found is None:
        raise ValueError(f"{path}: cannot tell the format from the extension; pass fmt='csv', 'tsv' or 'jsonl'")
    return found


def _sorted_label_names(labels: Iterable[str]) -> list[str]:
    """Distinct labels in sorted order; numerically when all are integers, so ``"10"`` comes after ``"9"``."""
    distinct = set(labels)
    if all(re.fullmatch(r"-?\d+", label) for label in distinct):
        return sorted(distinct, key=lambda label: (int(label), label))
    return sorted(distinct)


def read_table(
    path: Path | str,
    text_columns: Sequence[str] | str,
    label_column: str,
    fmt: TableFormat | None = None,
    label_names: Sequence[str] | None = None,
    regression: bool = False,
) -> tuple[list[Example], list[str]]:
    """Read a user's labelled CSV, TSV or JSON-lines file with named columns.

    Args:
        path: the file; its extension (``.csv``, ``.tsv``, ``.jsonl`` or ``.json`` for JSON lines)
            decides the format unless ``fmt`` is given.
        text_columns: one or two column (JSON key) names holding the texts.
        label_column: the column holding the label.
        fmt: ``"csv"`` (comma-separated, standard ``"`` quoting), ``"tsv"`` (tab-separated, no
            quoting, as GLUE) or ``"jsonl"`` (one JSON object per line).
        label_names: classification only: the label strings in class-id order, as returned when
            reading the train file; pass them when reading the eval file so both use the same ids.
            ``None`` derives them from this file: its distinct labels, sorted (numerically when all
            are integers).
        regression: labels are float scores instead of classes.

    Returns:
        The examples, and the label names in class-id order (empty for regression).

    Raises:
        DataError: a missing or empty file, a missing column, a short row, an empty text or label,
            a label not in ``label_names``, a non-numeric score, or a JSON line that is not an
            object; the message names the file and the line.
        ValueError: bad arguments (format, column count, ``label_names`` with ``regression``).
    """
    path = Path(path)
    # A bare string would otherwise be taken as a sequence of one-letter column names.
    columns = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
    if not 1 <= len(columns) <= 2:
        raise ValueError(f"one or two text columns, got {columns}")
    if regression and label_names is not None:
        raise ValueError("label_names is for classification; a regression task has none")
    table_format = _table_format(path, fmt)
    if table_format == "jsonl":
        records = _jsonl_records(path, columns, label_column)
    else:
        records = _delimited_records(
            path,
            delimiter="," if table_format == "csv" else "\t",
            # A TSV has no quoting convention (GLUE files are unquoted); CSV files are quoted by convention.
            quoting=csv.QUOTE_MINIMAL if table_format == "csv" else csv.QUOTE_NONE,
            encoding="utf-8-sig",
            text_columns=columns,
            label_column=label_column,
        )
    if regression:
        return _examples(records, [_score(path, r.line, r.label, label_column) for r in records]), []
    # Check for empty labels before deriving names, so "" never becomes a class.
    names = list(label_names) if label_names is not None else _sorted_label_names(r.label for r in records if r.label)
    return _examples(records, _class_ids(path, records, names, label_column)), names
