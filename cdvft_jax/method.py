"""What an adapter method is: a handful of pure functions of a layer's shape.

The injection, training, merge, save and sharding code only ever talks to an
:class:`AdapterMethod`, so a new method (LoRA, VeRA, FourierFT, ...) is a new
``AdapterMethod`` plus its :class:`~cdvft_jax.config.AdapterConfig` subclass.
Every function receives the layer's resolved config (overrides applied); those
that look at a layer's shape also receive its name, for error messages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

__all__ = ["AdapterMethod", "LayerParams", "never_random", "no_flops_per_step"]

LayerParams = Mapping[str, jax.Array]
"""One layer's adapter parameters, keyed by leaf name (all start with the method's prefix)."""


def never_random(config: Any) -> bool:
    """The default :attr:`AdapterMethod.needs_rng`: the delta is deterministic."""
    del config
    return False


def no_flops_per_step(d_in: int, d_out: int, config: Any, layer: str = "<layer>") -> float:
    """The default :attr:`AdapterMethod.flops_per_step`: nothing is rebuilt per step."""
    del d_in, d_out, config, layer
    return 0.0


class AdapterMethod(NamedTuple):
    """The pure functions that define an adapter method.

    Attributes:
      name: the method's name, as in ``config.method``.
      param_prefix: every adapter leaf name starts with it, so adapter leaves
        can be told apart from the wrapped layer's own ``kernel``/``bias``.
      param_shapes: ``(d_in, d_out, config, layer) -> {leaf: shape}``; raises
        ``ValueError`` naming the layer when the config does not fit it.
      init: ``(key, d_in, d_out, config, layer) -> {leaf: float32 array}``.
      delta: ``(params, x, d_out, config, rng) -> float32 (..., d_out)``, the unscaled
        delta ``x @ dW`` computed on activations; ``rng`` is ``None`` unless
        :attr:`needs_rng` says the config wants randomness (e.g. dropout) and
        the model is called in training mode with a ``dropout`` rng.
      delta_weight: ``(params, d_in, d_out, config) -> float32 (d_in, d_out)``, the
        unscaled dense ``dW`` in Flax kernel layout.
      flops_per_token: ``(d_in, d_out, config, layer) -> float``, analytic
        forward flops of the delta per token.
      frozen_leaves: names among ``param_shapes`` that are not trained (e.g.
        VeRA's shared random projections).  ``init`` must build them from the
        config alone, never from its key, so they are rebuilt rather than
        saved: they live in the frozen tree and adapter files omit them.
      needs_rng: ``config -> bool``, whether ``delta`` wants an rng in training.
      flops_per_step: ``(d_in, d_out, config, layer) -> float``, analytic
        flops of the weight-only work done once per forward pass whatever
        the number of tokens (CDVFT's spectra of ``c``, FourierFT's 2-D inverse FFT).
      learning_rate: the AdamW rate of the adapter leaves when none is given:
        :func:`~cdvft_jax.adapter_optimizer` uses it as a constant rate, the
        programs as the peak of their warm-up and linear decay.  CDVFT's is
        studied in ``benchmarks/NOTES.md``; the baselines' are their papers'
        RoBERTa-base GLUE rates.  A new method should set its own.
    """

    name: str
    param_prefix: str
    param_shapes: Callable[[int, int, Any, str], dict[str, tuple[int, ...]]]
    init: Callable[[jax.Array, int, int, Any, str], dict[str, jax.Array]]
    delta: Callable[[LayerParams, jax.Array, int, Any, jax.Array | None], jax.Array]
    delta_weight: Callable[[LayerParams, int, int, Any], jax.Array]
    flops_per_token: Callable[[int, int, Any, str], float]
    frozen_leaves: frozenset[str] = frozenset()
    needs_rng: Callable[[Any], bool] = never_random
    flops_per_step: Callable[[int, int, Any, str], float] = no_flops_per_step
    learning_rate: float = 1e-3

    def num_params(self, d_in: int, d_out: int, config: Any, layer: str = "<layer>") -> int:
        """Trainable parameters the method adds to one ``(d_in, d_out)`` layer (frozen leaves excluded)."""
        total = 0
        for name, shape in self.param_shapes(d_in, d_out, config, layer).items():
            if name in self.frozen_leaves:
                continue
            size = 1
            for s in shape:
                size *= s
            total += size
        return total
