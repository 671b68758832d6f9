"""``CDVDense``: an ``nn.Dense`` with a CDV adapter, for models you write yourself."""

from __future__ import annotations

import flax.linen as nn
import jax

from cdvft_jax.layer_types import AdapterLayerMarker
from cdvft_jax.methods.cdvft import CDVFT, CDVFTConfig

__all__ = ["CDVDense"]


class CDVDense(nn.Dense, AdapterLayerMarker):
    """``nn.Dense`` plus ``alpha * cdv_delta(x)``; params ``kernel``, ``bias`` and the CDV leaves.

    The kernel and bias keep ``nn.Dense``'s names and initialisers, so a
    pretrained ``nn.Dense`` checkpoint loads into it unchanged; the CDV leaves
    (``cdv_a_in``, ``cdv_c``, ``cdv_a_out`` for three factors) are created
    beside them by the ``init_scheme`` of :class:`~cdvft_jax.CDVFTConfig`.

    Attributes:
      block_size: circulant block size; ``None`` is ``min(d_in, d_out)``, one block per square layer.
      num_factors: odd number of alternating factors.
      alpha: scale of the delta.
      init_scheme: ``"zero"``, ``"identity"`` or ``"random"`` (see :data:`~cdvft_jax.INIT_SCHEMES`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = CDVDense(features=8)
      >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 8)))
      >>> sorted(variables["params"])
      ['bias', 'cdv_a_in', 'cdv_a_out', 'cdv_c', 'kernel']
    """

    block_size: int | None = None
    num_factors: int = 3
    alpha: float = 1.0
    init_scheme: str = "zero"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs)
        d_in = inputs.shape[-1]
        layer = "/".join(self.path) or type(self).__name__
        config = CDVFTConfig(
            target_modules=(layer,),
            block_size=self.block_size,
            num_factors=self.num_factors,
            alpha=self.alpha,
            init=self.init_scheme,
        )

        def init_leaf(key: jax.Array, name: str) -> jax.Array:
            return CDVFT.init(key, d_in, self.features, config, layer)[name]

        leaves = {
            name: self.param(name, init_leaf, name) for name in CDVFT.param_shapes(d_in, self.features, config, layer)
        }
        delta = CDVFT.delta(leaves, inputs, self.features, config, None)
        return y + (config.scaling * delta).astype(y.dtype)
