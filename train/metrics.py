"""GLUE evaluation metrics over plain predictions and labels.

Names follow the GLUE / Hugging Face ``evaluate`` conventions so that logged results line up
with published tables: ``accuracy``, ``f1`` (binary, positive class 1), ``matthews_correlation``,
``pearson`` and ``spearmanr``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

__all__ = ["CLASSIFICATION_METRICS", "METRIC_NAMES", "REGRESSION_METRICS", "compute_metrics"]

CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "f1", "matthews_correlation")
REGRESSION_METRICS: tuple[str, ...] = ("pearson", "spearmanr")
METRIC_NAMES: tuple[str, ...] = CLASSIFICATION_METRICS + REGRESSION_METRICS


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(accuracy_score(labels, predictions))


def _f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of class 1 (GLUE's MRPC/QQP F1); 0.0 when class 1 is never predicted nor present."""
    # zero_division=0.0 makes the degenerate case a number instead of a warning plus 0.0.
    return float(f1_score(labels, predictions, average="binary", pos_label=1, zero_division=0.0))


def _matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation; scikit-learn defines it as 0.0 when either side is constant."""
    return float(matthews_corrcoef(labels, predictions))


def _is_undefined_correlation(predictions: np.ndarray, labels: np.ndarray) -> bool:
    """True when a correlation has no value: fewer than two points or a constant side."""
    return predictions.size < 2 or bool(np.all(predictions == predictions[0])) or bool(np.all(labels == labels[0]))


def _pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson's r; NaN when undefined (see :func:`compute_metrics`)."""
    if _is_undefined_correlation(predictions, labels):
        return math.nan
    return float(pearsonr(predictions, labels).statistic)


def _spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman's rho; NaN when undefined (see :func:`compute_metrics`)."""
    if _is_undefined_correlation(predictions, labels):
        return math.nan
    return float(spearmanr(predictions, labels).statistic)


_METRICS = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews_correlation": _matthews,
    "pearson": _pearson,
    "spearmanr": _spearman,
}


def _as_vector(values: ArrayLike, what: str) -> np.ndarray:
    """``values`` as a 1-D array; a 2-D array is most likely logits that were not reduced."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(
            f"{what} must be 1-D (class ids or regression scores), got shape {array.shape}; "
            "take the argmax of logits first"
        )
    return array


def compute_metrics(metric_names: Sequence[str], predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Evaluate ``predictions`` against ``labels`` with each metric in ``metric_names``.

    Args:
        metric_names: names from :data:`METRIC_NAMES`, e.g. a task's ``TaskSpec.metrics``.
        predictions: class ids (classification) or floats (regression), one per example.
        labels: the gold class ids or scores, same length as ``predictions``.

    Returns:
        ``{name: value}`` with plain Python floats, in the order of ``metric_names``.

    ``pearson`` and ``spearmanr`` are undefined when either side is constant (e.g. a collapsed
    regression head predicting one value) or there are fewer than two examples; they are then
    ``float("nan")`` rather than an exception, so that one bad epoch does not abort training.
    ``matthews_correlation`` is 0.0 in the constant case, as scikit-learn defines it.

    Raises:
        ValueError: an unknown metric name, non-1-D inputs, a length mismatch or empty inputs.

    >>> compute_metrics(["accuracy"], [1, 0, 1, 1], [1, 1, 1, 0])
    {'accuracy': 0.5}
    """
    unknown = [name for name in metric_names if name not in _METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known metrics: {list(METRIC_NAMES)}")
    preds = _as_vector(predictions, "predictions")
    golds = _as_vector(labels, "labels")
    if preds.shape != golds.shape:
        raise ValueError(f"{preds.size} predictions but {golds.size} labels")
    if preds.size == 0:
        raise ValueError("cannot compute metrics on zero examples")
    return {name: _METRICS[name](preds, golds) for name in metric_names}
