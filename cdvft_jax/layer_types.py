"""The layer records shared by injection, merge and the layers: data, no behaviour.

A leaf module (it imports nothing of the library but the config type), so that ``injection``,
``merge`` and ``layers`` can all depend on it without depending on each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from cdvft_jax.config import AdapterConfig

__all__ = ["AdaptedLayer", "AdapterLayerMarker", "DenseLayer"]


class DenseLayer(NamedTuple):
    """An ``nn.Dense`` layer seen in a model: its module path and shape."""

    path: str
    d_in: int
    d_out: int


class AdaptedLayer(NamedTuple):
    """A layer that carries an adapter.

    Attributes:
      path: module path, ``/``-joined.
      d_in: input features.
      d_out: output features.
      config: the config with this layer's overrides applied.
      param_shapes: ``{leaf name: shape}`` of its adapter parameters.
    """

    path: str
    d_in: int
    d_out: int
    config: AdapterConfig
    param_shapes: Mapping[str, tuple[int, ...]]


class AdapterLayerMarker:
    """Mixin for modules that carry their own adapter; injection leaves them alone."""
