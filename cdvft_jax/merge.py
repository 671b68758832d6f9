"""Folding adapters into the frozen kernels (and back out) for zero-cost inference."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from cdvft_jax.layer_types import flax_layout
from cdvft_jax.params import flat_params, unflat_params

if TYPE_CHECKING:
    from cdvft_jax.layer_types import AdaptedLayer

__all__ = ["fold_adapters"]


@functools.partial(jax.jit, static_argnames=("method", "config", "sign", "layout"))
def _fold(kernel: jax.Array, leaves: Mapping[str, jax.Array], method, config, sign: float, layout) -> jax.Array:
    d_in, d_out = flax_layout(kernel, layout).shape
    update = flax_layout(method.delta_weight(leaves, d_in, d_out, config) * (sign * config.scaling), layout)
    return (kernel.astype(jnp.float32) + update).astype(kernel.dtype)


def fold_adapters(
    layers: Mapping[str, AdaptedLayer], params: Mapping[str, Any], sign: float, keep_adapter: bool
) -> dict:
    """Adds ``sign * scaling * dW`` to every adapted kernel (in the kernel's own layout).

    Args:
      layers: the adapted layers to fold, by module path (``AdaptedModel.layers``); each layer's
        config (overrides applied) gives its method and scaling.
      params: base params plus adapter leaves for every adapted layer.
      sign: ``+1`` merges, ``-1`` unmerges.
      keep_adapter: keep the adapter leaves in the result (else drop them).

    Raises:
      ValueError: if an adapted layer's kernel or adapter leaves are missing.
    """
    flat = flat_params(params)
    for path, layer in layers.items():
        names = [f"{path}/{n}" for n in layer.param_shapes]
        missing = [n for n in [*names, f"{path}/kernel"] if n not in flat]
        if missing:
            raise ValueError(f"cannot fold layer {path!r}: params lack {missing}")
        leaves = {n: flat[f"{path}/{n}"] for n in layer.param_shapes}
        if not keep_adapter:
            for name in names:
                del flat[name]
        key = f"{path}/kernel"
        method = layer.config.adapter_method
        flat[key] = _fold(flat[key], leaves, method, layer.config, sign, layer.kernel_layout)
    return unflat_params(flat)
