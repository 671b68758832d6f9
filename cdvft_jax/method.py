"""What an adapter method is: a handful of pure functions of a layer's shape.

The injection, training, merge, save and sharding code only ever talks to an
:class:`AdapterMethod`, so a new method (LoRA, VeRA, FourierFT, ...) is a new
``AdapterMethod`` plus its :class:`~cdvft_jax.config.AdapterConfig` subclass.
Every function receives the layer's resolved config (overrides applied) and the
layer's name for error messages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

__all__ = ["AdapterMethod", "LayerParams"]

LayerParams = Mapping[str, jax.Array]
"""One layer's adapter parameters, keyed by leaf name (all start with the method's prefix)."""


class AdapterMethod(NamedTuple):
    """The pure functions that define an adapter method.

    Attributes:
      name: the method's name, as in ``config.method``.
      param_prefix: every adapter leaf name starts with it, so adapter leaves
        can be told apart from the wrapped layer's own ``kernel``/``bias``.
      param_shapes: ``(d_in, d_out, config, layer) -> {leaf: shape}``; raises
        ``ValueError`` naming the layer when the config does not fit it.
      init: ``(key, d_in, d_out, config, layer) -> {leaf: float32 array}``.
      delta: ``(params, x, config) -> float32 (..., d_out)``, the unscaled
        delta ``x @ dW`` computed on activations.
      delta_weight: ``(params, config) -> float32 (d_in, d_out)``, the
        unscaled dense ``dW`` in Flax kernel layout.
      flops_per_token: ``(d_in, d_out, config, layer) -> float``, analytic
        forward flops of the delta per token.
    """

    name: str
    param_prefix: str
    param_shapes: Callable[[int, int, Any, str], dict[str, tuple[int, ...]]]
    init: Callable[[jax.Array, int, int, Any, str], dict[str, jax.Array]]
    delta: Callable[[LayerParams, jax.Array, Any], jax.Array]
    delta_weight: Callable[[LayerParams, Any], jax.Array]
    flops_per_token: Callable[[int, int, Any, str], float]

    def num_params(self, d_in: int, d_out: int, config: Any, layer: str = "<layer>") -> int:
        """Trainable parameters the method adds to one ``(d_in, d_out)`` layer."""
        total = 0
        for shape in self.param_shapes(d_in, d_out, config, layer).values():
            size = 1
            for s in shape:
                size *= s
            total += size
        return total
