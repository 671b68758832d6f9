"""CDVFT as an adapter method: its config and its :class:`AdapterMethod` functions.

Leaf names inside an adapted linear layer's scope, for ``num_factors = 2m - 1``:
``cdv_a_in`` (input diagonal), ``cdv_c`` (first circulant, ``d_in -> d_out``),
then ``cdv_a1, cdv_c2, cdv_a2, cdv_c3, ...`` for the inner factors, and
``cdv_a_out`` (output diagonal).  The paper's three factors are
``cdv_a_in, cdv_c, cdv_a_out``; a lone diagonal (``num_factors=1``) is
``cdv_a_out``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from cdvft_jax import cdv
from cdvft_jax.config import ALL_LINEAR, AdapterConfig, ModulePatterns
from cdvft_jax.methods.base import AdapterMethod, LayerParams, MethodSpec, SizeSetting, register

__all__ = ["CDVFT", "CDVFTConfig", "INIT_SCHEMES"]

INIT_SCHEMES = ("zero", "identity", "random")
"""``zero`` (default): ``a_out = 0``, other diagonals 1, circulants ~ N(0, 1/p):
the adapted model starts exactly at the base model and every vector gets a
gradient from the second step on.  ``identity``: as ``zero`` but every
circulant is the identity on its diagonal blocks.  ``random`` (paper-style):
diagonals ~ N(0, 1) and circulants ~ N(0, 1/p), so the model moves at step 0."""

PREFIX = "cdv_"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CDVFTConfig(AdapterConfig):
    """Configuration of CDVFT adapters.

    Attributes:
      target_modules: layers to adapt; query and value by default (the paper).
      block_size: circulant block size ``p``, a divisor of the layer's smaller
        dimension; ``None`` is the smaller dimension itself: one block for a
        square layer, one block row or column otherwise, the larger side
        zero-padded to whole blocks when ``p`` does not divide it (see
        :func:`~cdvft_jax.cdv_shape`).
      num_factors: odd number of alternating diag/circulant factors (3 in the paper).
      init: one of :data:`INIT_SCHEMES`.
      (See :class:`~cdvft_jax.config.AdapterConfig` for the other fields.)

    Example:
      >>> cfg = CDVFTConfig(target_modules=["query", "value"], modules_to_save=["classifier"])
      >>> CDVFTConfig.from_json(cfg.to_json()) == cfg
      True
    """

    method: ClassVar[str] = "cdvft"

    target_modules: ModulePatterns = ("query", "value")
    block_size: int | None = None
    num_factors: int = 3
    init: Literal["zero", "identity", "random"] = "zero"

    def __post_init__(self) -> None:
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {self.init!r}")
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0
        ):
            raise ValueError(f"block_size must be a positive int or None, got {self.block_size!r}")
        if (
            isinstance(self.num_factors, bool)
            or not isinstance(self.num_factors, int)
            or (self.num_factors < 1 or self.num_factors % 2 == 0)
        ):
            raise ValueError(f"num_factors must be an odd int >= 1, got {self.num_factors!r}")
        super().__post_init__()

    @property
    def adapter_method(self) -> AdapterMethod:
        return CDVFT


def _factor_names(num_factors: int) -> tuple[list[str], list[str]]:
    """Leaf names of the diagonals (input first) and the circulants, in product order."""
    m = (num_factors + 1) // 2
    if m == 1:
        return [PREFIX + "a_out"], []
    diagonals = [PREFIX + "a_in"] + [f"{PREFIX}a{k}" for k in range(1, m - 1)] + [PREFIX + "a_out"]
    circulants = [PREFIX + "c"] + [f"{PREFIX}c{k}" for k in range(2, m)]
    return diagonals, circulants


def _shape(d_in: int, d_out: int, config: CDVFTConfig, layer: str) -> cdv.CDVShape:
    return cdv.cdv_shape(d_in, d_out, config.block_size, config.num_factors, layer)


def param_shapes(d_in: int, d_out: int, config: CDVFTConfig, layer: str = "<layer>") -> dict:
    shape = _shape(d_in, d_out, config, layer)
    diag_names, circ_names = _factor_names(config.num_factors)
    return dict(zip(diag_names, shape.diagonal_shapes, strict=True)) | dict(
        zip(circ_names, shape.circulant_shapes, strict=True)
    )


def init(key: jax.Array, d_in: int, d_out: int, config: CDVFTConfig, layer: str = "<layer>") -> dict:
    shape = _shape(d_in, d_out, config, layer)
    diag_names, circ_names = _factor_names(config.num_factors)
    p = shape.block_size
    keys = iter(jax.random.split(key, len(diag_names) + len(circ_names)))
    params = {}
    for name, s in zip(diag_names, shape.diagonal_shapes, strict=True):
        k = next(keys)
        if config.init == "random":
            params[name] = jax.random.normal(k, s, jnp.float32)
        elif name == PREFIX + "a_out":
            params[name] = jnp.zeros(s, jnp.float32)
        else:
            params[name] = jnp.ones(s, jnp.float32)
    for name, s in zip(circ_names, shape.circulant_shapes, strict=True):
        k = next(keys)
        if config.init == "identity":
            q_out, q_in, _ = s
            eye = jnp.eye(q_out, q_in, dtype=jnp.float32)
            params[name] = jnp.zeros(s, jnp.float32).at[:, :, 0].set(eye)
        else:
            params[name] = jax.random.normal(k, s, jnp.float32) * (1.0 / p) ** 0.5
    return params


def _factors(params: LayerParams, config: CDVFTConfig) -> tuple[list[jax.Array], list[jax.Array]]:
    diag_names, circ_names = _factor_names(config.num_factors)
    return [params[n] for n in diag_names], [params[n] for n in circ_names]


def delta(params: LayerParams, x: jax.Array, d_out: int, config: CDVFTConfig, rng: jax.Array | None) -> jax.Array:
    del d_out, rng  # the factors carry the shape; the delta is deterministic
    diagonals, circulants = _factors(params, config)
    return cdv.cdv_product_delta(x, diagonals, circulants, out_dtype=jnp.float32)


def delta_weight(params: LayerParams, d_in: int, d_out: int, config: CDVFTConfig) -> jax.Array:
    del d_in, d_out
    diagonals, circulants = _factors(params, config)
    return cdv.cdv_product_weight(diagonals, circulants)


def flops_per_token(d_in: int, d_out: int, config: CDVFTConfig, layer: str = "<layer>") -> float:
    return cdv.cdv_flops_per_token(_shape(d_in, d_out, config, layer))


def flops_per_step(d_in: int, d_out: int, config: CDVFTConfig, layer: str = "<layer>") -> float:
    return cdv.cdv_flops_per_step(_shape(d_in, d_out, config, layer))


CDVFT = AdapterMethod(
    name="cdvft",
    param_prefix=PREFIX,
    param_shapes=param_shapes,
    init=init,
    delta=delta,
    delta_weight=delta_weight,
    flops_per_token=flops_per_token,
    flops_per_step=flops_per_step,
    learning_rate=5e-3,
)
"""The CDVFT :class:`~cdvft_jax.methods.AdapterMethod`."""

register(
    MethodSpec(
        CDVFT,
        CDVFTConfig,
        sizes=(
            SizeSetting("block_size", "circulant block size p (default: min(d_in, d_out), one block per square layer)"),
        ),
        # The papers' settings, for the benchmarks.
        paper_settings={"roberta-base": {}, "vit-base": {}},
        # Every linear layer costs about what LoRA r=8 spends on query and value alone, and it beat query
        # and value on the validation splits of SST-2, STS-B and QNLI (benchmarks/NOTES.md).
        target_modules=(ALL_LINEAR,),
    )
)
