"""Splitting a parameter tree into disjoint parts and putting it back together.

Parameter trees are nested dicts of arrays (Flax's ``params`` collection);
leaves are addressed by their ``/``-joined path, e.g.
``roberta/encoder/layer/0/attention/self/query/kernel``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import traverse_util
from flax.core import unfreeze

__all__ = ["count_params", "flat_params", "merge_params", "split_params", "unflat_params"]

Params = Mapping[str, Any]


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
