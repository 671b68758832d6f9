"""VeRA (Kopiczko et al., 2024) as an adapter method: frozen random projections, trainable scalings.

``dW = A diag(lambda_d) B diag(lambda_b)`` in Flax kernel layout, so the delta
on activations is ``((dropout(x) @ A) * lambda_d) @ B * lambda_b``.  Leaf names
inside an adapted linear layer's scope:

* ``vera_lambda_d`` ``(r,)``, trainable, starts at ``d_initial`` (0.1);
* ``vera_lambda_b`` ``(d_out,)``, trainable, starts at zero, so the adapted
  model starts at the base model;
* ``vera_a`` ``(d_in, r)`` and ``vera_b`` ``(r, d_out)``: frozen, drawn from
  ``projection_seed`` alone with PyTorch's ``kaiming_uniform_`` bounds
  (``±sqrt(6 / fan_in)``, fan-in ``d_in`` for ``A`` and ``r`` for ``B``).  Every layer of
  the same shape therefore holds the same matrices, VeRA's sharing; they live in the
  frozen tree and adapter files omit them (they are rebuilt from the config).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from cdvft_jax.config import (
    AdapterConfig,
    ModulePatterns,
    check_dropout,
    check_finite_number,
    check_int,
    check_positive_int,
)
from cdvft_jax.methods.base import AdapterMethod, LayerParams, MethodSpec, SizeSetting, register
from cdvft_jax.methods.lora import input_dropout, uses_dropout

__all__ = ["VERA", "VeRAConfig", "vera_projections"]

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeRAConfig(AdapterConfig):
    """Configuration of VeRA adapters.

    Attributes:
      target_modules: layers to adapt; query and value by default.
      rank: the rank ``r`` of the shared random projections.
      projection_seed: seeds the frozen projections ``A`` and ``B``.
      d_initial: initial value of every entry of ``lambda_d``.
      dropout: dropout rate on the adapter's input in training calls.
      alpha: scale of the delta (1 in VeRA).
      (See :class:`~cdvft_jax.config.AdapterConfig` for the other fields.)

    Example:
      >>> VERA.num_params(768, 768, VeRAConfig(rank=256))  # lambda_d + lambda_b
      1024
    """

    method: ClassVar[str] = "vera"

    target_modules: ModulePatterns = ("query", "value")
    rank: int = 256
    projection_seed: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int(self.rank, "rank")
        check_dropout(self.dropout)
        check_int(self.projection_seed, "projection_seed")
        check_finite_number(self.d_initial, "d_initial")
        super().__post_init__()

    @property
    def adapter_method(self) -> AdapterMethod:
        return VERA


def vera_projections(d_in: int, d_out: int, rank: int, seed: int) -> tuple[jax.Array, jax.Array]:
    """The frozen ``(A, B)`` of shapes ``(d_in, rank)`` and ``(rank, d_out)`` for ``seed``.

    >>> a, b = vera_projections(8, 4, 2, seed=0)
    >>> a.shape, b.shape
    ((8, 2), (2, 4))
    """
    key_a, key_b = jax.random.split(jax.random.key(seed))
    bound_a, bound_b = (6.0 / d_in) ** 0.5, (6.0 / rank) ** 0.5
    # Folding in the size makes a matrix depend on its own shape only.
    a = jax.random.uniform(jax.random.fold_in(key_a, d_in), (d_in, rank), jnp.float32, -bound_a, bound_a)
    b = jax.random.uniform(jax.random.fold_in(key_b, d_out), (rank, d_out), jnp.float32, -bound_b, bound_b)
    return a, b


def _param_shapes(d_in: int, d_out: int, config: VeRAConfig, layer: str = "<layer>") -> dict:
    del layer
    r = config.rank
    return {"vera_lambda_d": (r,), "vera_lambda_b": (d_out,), "vera_a": (d_in, r), "vera_b": (r, d_out)}


def _init(key: jax.Array, d_in: int, d_out: int, config: VeRAConfig, layer: str = "<layer>") -> dict:
    del key, layer  # nothing random is trainable; the projections come from the seed
    a, b = vera_projections(d_in, d_out, config.rank, config.projection_seed)
    return {
        "vera_lambda_d": jnp.full((config.rank,), config.d_initial, jnp.float32),
        "vera_lambda_b": jnp.zeros((d_out,), jnp.float32),
        "vera_a": a,
        "vera_b": b,
    }


def _delta(params: LayerParams, x: jax.Array, d_out: int, config: VeRAConfig, rng: jax.Array | None) -> jax.Array:
    del d_out
    x = input_dropout(x, config.dropout, rng)
    h = (x @ params["vera_a"]) * params["vera_lambda_d"]
    return (h @ params["vera_b"]) * params["vera_lambda_b"]


def _delta_weight(params: LayerParams, d_in: int, d_out: int, config: VeRAConfig) -> jax.Array:
    del d_in, d_out, config
    a = params["vera_a"] * params["vera_lambda_d"]
    return jnp.matmul(a, params["vera_b"], precision=_HIGHEST) * params["vera_lambda_b"]


def _flops_per_token(d_in: int, d_out: int, config: VeRAConfig, layer: str = "<layer>") -> float:
    """Two matmuls (a multiply-add = 2 flops) and two scalings: ``2 r (d_in + d_out) + r + d_out``."""
    del layer
    r = config.rank
    return 2.0 * r * (d_in + d_out) + r + d_out


VERA = AdapterMethod(
    name="vera",
    param_prefix="vera_",
    param_shapes=_param_shapes,
    init=_init,
    delta=_delta,
    delta_weight=_delta_weight,
    flops_per_token=_flops_per_token,
    frozen_leaves=frozenset({"vera_a", "vera_b"}),
    needs_rng=uses_dropout,
    learning_rate=1e-2,  # the paper's RoBERTa-base GLUE rate
)
"""The VeRA :class:`~cdvft_jax.methods.AdapterMethod`."""

register(
    MethodSpec(
        VERA,
        VeRAConfig,
        sizes=(SizeSetting("rank", "the rank of the shared random projections"),),
        # The papers' settings, for the benchmarks.
        paper_settings={"roberta-base": {"rank": 256}, "vit-base": {"rank": 256}},
    )
)
