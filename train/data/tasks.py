"""GLUE-style tasks: what a task is (:class:`TaskSpec`), the known ones (:data:`TASKS`), and the data types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from train.metrics import METRIC_NAMES

Split = Literal["train", "dev"]


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
