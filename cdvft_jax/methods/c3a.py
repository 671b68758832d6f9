"""C3A (Chen et al., 2024, arXiv 2407.19342) as an adapter method: one block-circulant ``dW``, as peft has it.

peft's C3A stores ``c3a_kernel`` of shape ``(d_out / b, d_in / b, b)`` and adds
``x @ dW`` with, in PyTorch's ``(out, in)`` layout, block ``(i, j)`` of ``dW``
equal to ``circ(w[i, j]) / d_in``: entry ``(r, s)`` of the block is
``w[i, j, (s - r) mod b] / d_in`` (the kernel is each block's *first row*,
where CDVFT's ``c`` is each block's first column).  There are no diagonals, and
``alpha`` (1 by default) scales the delta like every method's.

Against CDVFT this isolates what the diagonals buy: the same circulant
structure and parameter budget per block, without ``a_in`` / ``a_out``.

The single leaf inside an adapted linear layer's scope is ``c3a_kernel``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from cdvft_jax import cdv
from cdvft_jax.config import AdapterConfig, ModulePatterns
from cdvft_jax.methods.base import AdapterMethod, LayerParams, MethodSpec, SizeSetting, register

__all__ = ["C3A", "C3AConfig", "C3A_INIT_SCHEMES"]

C3A_INIT_SCHEMES = ("xavier_uniform", "kaiming_uniform", "gaussian", "zero")
"""peft's ``init_weights`` options: ``xavier_uniform`` (peft's default), uniform in
``+-sqrt(6 / (d_in + d_out))``; ``kaiming_uniform``, uniform in ``+-sqrt(1 / d_in)``;
``gaussian``, N(0, 1); ``zero`` (peft's ``init_weights=True``): the adapted model starts
exactly at the base model."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class C3AConfig(AdapterConfig):
    """Configuration of C3A adapters.

    Attributes:
      target_modules: layers to adapt; query and value by default.
      block_size: the circulant block size ``b``; it must divide both ``d_in`` and ``d_out``.
        ``None`` is ``gcd(d_in, d_out)`` (one block for a square layer), which peft's docs advise
        when in doubt (peft's own default, 256, divides neither of MiniLM's 384).
      init: one of :data:`C3A_INIT_SCHEMES`.
      (See :class:`~cdvft_jax.config.AdapterConfig` for the other fields.)

    Example:
      >>> C3A.num_params(768, 3072, C3AConfig(block_size=256))  # 12 x 3 blocks of 256
      9216
    """

    method: ClassVar[str] = "c3a"

    target_modules: ModulePatterns = ("query", "value")
    block_size: int | None = None
    init: Literal["xavier_uniform", "kaiming_uniform", "gaussian", "zero"] = "xavier_uniform"

    def __post_init__(self) -> None:
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0
        ):
            raise ValueError(f"block_size must be a positive int or None, got {self.block_size!r}")
        if self.init not in C3A_INIT_SCHEMES:
            raise ValueError(f"init must be one of {C3A_INIT_SCHEMES}, got {self.init!r}")
        super().__post_init__()

    @property
    def adapter_method(self) -> AdapterMethod:
        return C3A


def _kernel_shape(d_in: int, d_out: int, config: C3AConfig, layer: str) -> tuple[int, int, int]:
    # CDV's shape check with peft's rule (the block size divides both sides); its error lists the valid sizes.
    (shape,) = cdv.cdv_shape(d_in, d_out, config.block_size, num_factors=3, layer=layer, pad=False).circulant_shapes
    return shape


def _param_shapes(d_in: int, d_out: int, config: C3AConfig, layer: str = "<layer>") -> dict:
    return {"c3a_kernel": _kernel_shape(d_in, d_out, config, layer)}


def _init(key: jax.Array, d_in: int, d_out: int, config: C3AConfig, layer: str = "<layer>") -> dict:
    shape = _kernel_shape(d_in, d_out, config, layer)
    if config.init == "zero":
        kernel = jnp.zeros(shape, jnp.float32)
    elif config.init == "gaussian":
        kernel = jax.random.normal(key, shape, jnp.float32)
    else:
        bound = math.sqrt(6.0 / (d_in + d_out)) if config.init == "xavier_uniform" else math.sqrt(1.0 / d_in)
        kernel = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    return {"c3a_kernel": kernel}


def _first_columns(kernel: jax.Array) -> jax.Array:
    """CDV's first columns of the blocks whose first rows are ``kernel``: ``c[k] = w[-k mod b]``."""
    return jnp.roll(jnp.flip(kernel, axis=-1), 1, axis=-1)


def _delta(params: LayerParams, x: jax.Array, d_out: int, config: C3AConfig, rng: jax.Array | None) -> jax.Array:
    del d_out, config, rng  # the kernel carries the shape; deterministic
    return cdv.block_circulant_apply(_first_columns(params["c3a_kernel"]), x) / x.shape[-1]


def _delta_weight(params: LayerParams, d_in: int, d_out: int, config: C3AConfig) -> jax.Array:
    del d_out, config
    return cdv.block_circulant_matrix(_first_columns(params["c3a_kernel"])).T / d_in


def _circulant_only(d_in: int, d_out: int, config: C3AConfig, layer: str) -> cdv.CDVShape:
    """CDV's shape with the diagonals' lengths zeroed, so CDV's flop counts cover the circulant alone."""
    shape = cdv.cdv_shape(d_in, d_out, config.block_size, num_factors=3, layer=layer, pad=False)
    return shape._replace(diagonal_shapes=((0,), (0,)))


def _flops_per_token(d_in: int, d_out: int, config: C3AConfig, layer: str = "<layer>") -> float:
    """CDV's count for the block-circulant product (FFTs and the frequency-domain sum), plus the ``1 / d_in``."""
    return cdv.cdv_flops_per_token(_circulant_only(d_in, d_out, config, layer)) + d_out


def _flops_per_step(d_in: int, d_out: int, config: C3AConfig, layer: str = "<layer>") -> float:
    """The real FFT of every block's kernel, as for CDVFT's ``c``."""
    return cdv.cdv_flops_per_step(_circulant_only(d_in, d_out, config, layer))


C3A = AdapterMethod(
    name="c3a",
    param_prefix="c3a_",
    param_shapes=_param_shapes,
    init=_init,
    delta=_delta,
    delta_weight=_delta_weight,
    flops_per_token=_flops_per_token,
    flops_per_step=_flops_per_step,
    # The delta is divided by d_in, so the kernel has to grow to about d_in times a weight entry: an Adam
    # rate far above the other methods'.  SST-2 validation trials (benchmarks/NOTES.md): 1e-2 / 1e-1 / 1 / 3
    # gave 0.735 / 0.832 / 0.853 / 0.824.
    learning_rate=1.0,
)
"""The C3A :class:`~cdvft_jax.methods.AdapterMethod`."""

register(
    MethodSpec(
        C3A,
        C3AConfig,
        sizes=(SizeSetting("block_size", "circulant block size b (default: gcd(d_in, d_out))"),),
        # The benchmarks' settings: one block per square layer, the parameter budget of CDVFT's circulant.
        paper_settings={"roberta-base": {}, "vit-base": {}},
    )
)
