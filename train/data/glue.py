"""GLUE splits: from files in the GLUE download layout, or from the Hugging Face hub."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

from train.data.records import _delimited_records, _labelled_examples
from train.data.tasks import DataError, Example, Split, TaskSpec, _normalise_task_name, find_task


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
