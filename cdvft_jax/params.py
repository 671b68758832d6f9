"""Splitting a parameter tree into disjoint parts and putting it back together.

Parameter trees are nested dicts of arrays (Flax's ``params`` collection);
leaves are addressed by their ``/``-joined path, e.g.
``roberta/encoder/layer/0/attention/self/query/kernel``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

__all__ = [
    "NonFiniteError",
    "Params",
    "check_finite",
    "count_params",
    "flat_params",
    "merge_params",
    "non_finite_leaves",
    "split_params",
    "unflat_params",
]

Params = Mapping[str, Any]
"""A parameter tree: nested mappings of arrays (Flax's ``params`` collection), the one alias of the library."""


def flat_params(params: Params) -> dict[str, Any]:
    """``{"a/b/kernel": leaf, ...}`` for a nested params dict (FrozenDict accepted)."""
    return traverse_util.flatten_dict(unfreeze(params), sep="/")


def unflat_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flat_params`."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def split_params(params: Params, predicate: Callable[[str], bool]) -> tuple[dict, dict]:
    """Splits ``params`` into ``(selected, rest)`` by a predicate on leaf paths.

    Both parts keep the nested layout, so ``merge_params(selected, rest)``
    gives back ``params``.

    >>> split_params({"a": {"x": 1, "y": 2}}, lambda path: path.endswith("x"))
    ({'a': {'x': 1}}, {'a': {'y': 2}})
    """
    selected, rest = {}, {}
    for path, leaf in flat_params(params).items():
        (selected if predicate(path) else rest)[path] = leaf
    return unflat_params(selected), unflat_params(rest)


def merge_params(*trees: Params) -> dict:
    """The union of disjoint parameter trees.

    Raises:
      ValueError: if two trees hold a leaf at the same path.
    """
    merged: dict[str, Any] = {}
    for tree in trees:
        for path, leaf in flat_params(tree).items():
            if path in merged:
                raise ValueError(f"parameter {path!r} is present in more than one tree")
            merged[path] = leaf
    return unflat_params(merged)


def count_params(params: Params) -> int:
    """Number of scalars in a params tree (works on ``jax.eval_shape`` output too)."""
    total = 0
    for leaf in flat_params(params).values():
        size = 1
        for s in leaf.shape:
            size *= s
        total += size
    return total


class NonFiniteError(ValueError):
    """A parameter tree holds a NaN or an infinity where only finite values may go (a save, a merge)."""


def non_finite_leaves(params: Params) -> list[str]:
    """The paths of the floating-point leaves of ``params`` that hold a NaN or an infinity.

    The values are read to the host, so ``params`` must be concrete (not traced inside ``jit``).

    >>> non_finite_leaves({"a": {"x": np.ones(2), "y": np.array([1.0, np.nan])}})
    ['a/y']

    Raises:
      TypeError: if a leaf is a tracer.
    """
    bad = []
    for path, leaf in flat_params(params).items():
        if isinstance(leaf, jax.core.Tracer):
            raise TypeError(f"cannot read leaf {path!r} for a finite-value check inside a traced function (jit, grad)")
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
            continue
        # NumPy leaves are checked on the host, device arrays where they live (one scalar comes back).
        finite = np.isfinite(leaf).all() if isinstance(leaf, np.ndarray) else jax.numpy.isfinite(leaf).all()
        if not bool(finite):
            bad.append(path)
    return bad


def check_finite(params: Params, what: str) -> None:
    """Raises :class:`NonFiniteError` naming ``what`` and the leaves of ``params`` that are not finite."""
    bad = non_finite_leaves(params)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise NonFiniteError(f"{what} holds NaN or infinite values in {len(bad)} leaves: {shown}")
