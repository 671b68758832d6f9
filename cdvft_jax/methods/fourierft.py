"""FourierFT (Gao et al., 2024) as an adapter method: a few trainable 2-D spectral coefficients.

``n`` coefficients sit at fixed random ``(row, col)`` positions of a
``d_in x d_out`` spectrum (zero elsewhere); ``dW`` is the real part of its 2-D
inverse FFT (``numpy.fft.ifft2`` normalisation, i.e. divided by
``d_in * d_out``), times ``alpha`` (FourierFT's "scale", 150 by default).  As
the method prescribes, ``dW`` is rebuilt from the coefficients in every
forward pass and applied as ``x @ dW``.

The single leaf inside an adapted linear layer's scope is ``fourierft_spectrum``
of shape ``(n,)``.  The positions are not parameters: they follow from
``random_loc_seed`` and the layer's shape (:func:`spectral_positions`), so every
layer of the same shape uses the same positions, as in FourierFT.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from cdvft_jax.config import AdapterConfig, ModulePatterns, check_int, check_positive_int
from cdvft_jax.methods.base import AdapterMethod, LayerParams, MethodSpec, SizeSetting, register

__all__ = ["FOURIERFT", "FOURIERFT_INIT_SCHEMES", "FourierFTConfig", "spectral_positions"]

FOURIERFT_INIT_SCHEMES = ("random", "zero")
"""``random`` (FourierFT's default): coefficients ~ N(0, 1), so the model moves at
step 0.  ``zero``: the adapted model starts exactly at the base model."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FourierFTConfig(AdapterConfig):
    """Configuration of FourierFT adapters.

    Attributes:
      target_modules: layers to adapt; query and value by default.
      n_frequency: trainable spectral coefficients per layer.
      alpha: FourierFT's scale of ``dW`` (150 in the paper's RoBERTa-base runs).
      random_loc_seed: seeds the coefficients' positions.
      init: one of :data:`FOURIERFT_INIT_SCHEMES`.
      (See :class:`~cdvft_jax.config.AdapterConfig` for the other fields.)

    Example:
      >>> FOURIERFT.num_params(768, 768, FourierFTConfig(n_frequency=1000))
      1000
    """

    method: ClassVar[str] = "fourierft"

    target_modules: ModulePatterns = ("query", "value")
    n_frequency: int = 1000
    alpha: float = 150.0
    random_loc_seed: int = 777
    init: Literal["random", "zero"] = "random"

    def __post_init__(self) -> None:
        check_positive_int(self.n_frequency, "n_frequency")
        check_int(self.random_loc_seed, "random_loc_seed")
        if self.init not in FOURIERFT_INIT_SCHEMES:
            raise ValueError(f"init must be one of {FOURIERFT_INIT_SCHEMES}, got {self.init!r}")
        super().__post_init__()

    @property
    def adapter_method(self) -> AdapterMethod:
        return FOURIERFT


@functools.lru_cache(maxsize=64)
def spectral_positions(d_in: int, d_out: int, n_frequency: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)``: ``n_frequency`` distinct positions in a ``d_in x d_out`` spectrum, drawn from ``seed``.

    >>> rows, cols = spectral_positions(4, 3, 5, seed=0)
    >>> len(set(zip(rows.tolist(), cols.tolist())))
    5
    """
    flat = np.random.default_rng(seed).choice(d_in * d_out, size=n_frequency, replace=False)
    rows, cols = np.divmod(flat.astype(np.int64), d_out)
    rows, cols = rows.astype(np.int32), cols.astype(np.int32)
    rows.flags.writeable = cols.flags.writeable = False  # cached: shared by every caller
    return rows, cols


def _check_fits(d_in: int, d_out: int, config: FourierFTConfig, layer: str) -> None:
    if config.n_frequency > d_in * d_out:
        raise ValueError(
            f"layer {layer!r} ({d_in} x {d_out}) has {d_in * d_out} spectral positions, "
            f"fewer than n_frequency={config.n_frequency}"
        )


def _param_shapes(d_in: int, d_out: int, config: FourierFTConfig, layer: str = "<layer>") -> dict:
    _check_fits(d_in, d_out, config, layer)
    return {"fourierft_spectrum": (config.n_frequency,)}


def _init(key: jax.Array, d_in: int, d_out: int, config: FourierFTConfig, layer: str = "<layer>") -> dict:
    _check_fits(d_in, d_out, config, layer)
    shape = (config.n_frequency,)
    if config.init == "zero":
        return {"fourierft_spectrum": jnp.zeros(shape, jnp.float32)}
    return {"fourierft_spectrum": jax.random.normal(key, shape, jnp.float32)}


def _delta_weight(params: LayerParams, d_in: int, d_out: int, config: FourierFTConfig) -> jax.Array:
    rows, cols = spectral_positions(d_in, d_out, config.n_frequency, config.random_loc_seed)
    spectrum = jnp.zeros((d_in, d_out), jnp.float32).at[rows, cols].set(params["fourierft_spectrum"])
    return jnp.fft.ifft2(spectrum).real


def _delta(params: LayerParams, x: jax.Array, d_out: int, config: FourierFTConfig, rng: jax.Array | None) -> jax.Array:
    del rng  # deterministic
    d_in = x.shape[-1]
    return x.astype(jnp.float32) @ _delta_weight(params, d_in, d_out, config)


def _flops_per_token(d_in: int, d_out: int, config: FourierFTConfig, layer: str = "<layer>") -> float:
    """``x @ dW``, a multiply-add counted as 2 flops: ``2 d_in d_out`` (building ``dW`` is per step)."""
    del config, layer
    return 2.0 * d_in * d_out


def _flops_per_step(d_in: int, d_out: int, config: FourierFTConfig, layer: str = "<layer>") -> float:
    """The 2-D inverse FFT that rebuilds ``dW``: ``5 N log2 N`` for ``N = d_in d_out`` complex points."""
    del config, layer
    n = d_in * d_out
    return 5.0 * n * math.log2(n)


FOURIERFT = AdapterMethod(
    name="fourierft",
    param_prefix="fourierft_",
    param_shapes=_param_shapes,
    init=_init,
    delta=_delta,
    delta_weight=_delta_weight,
    flops_per_token=_flops_per_token,
    flops_per_step=_flops_per_step,
    learning_rate=5e-2,  # the paper's RoBERTa-base GLUE rate
)
"""The FourierFT :class:`~cdvft_jax.methods.AdapterMethod`."""

register(
    MethodSpec(
        FOURIERFT,
        FourierFTConfig,
        sizes=(SizeSetting("n_frequency", "spectral coefficients per layer"),),
        # The papers' settings, for the benchmarks.
        paper_settings={
            "roberta-base": {"n_frequency": 1000, "alpha": 150.0},
            "vit-base": {"n_frequency": 3000, "alpha": 300.0},
        },
    )
)
