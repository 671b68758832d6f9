"""LoRA (Hu et al., 2021) as an adapter method: ``dW = A @ B`` of rank ``r``, scaled by ``alpha / r``.

Leaf names inside an adapted linear layer's scope: ``lora_a`` of shape
``(d_in, r)`` and ``lora_b`` of shape ``(r, d_out)`` (Flax kernel layout, so
the delta on activations is ``dropout(x) @ lora_a @ lora_b``).  ``lora_a``
starts like PyTorch's ``kaiming_uniform_(a=sqrt(5))``, i.e. uniform in
``±1/sqrt(d_in)``, and ``lora_b`` at zero, so the adapted model starts at the
base model.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from cdvft_jax.config import AdapterConfig, ModulePatterns, check_dropout, check_positive_int
from cdvft_jax.methods.base import AdapterMethod, LayerParams, MethodSpec, SizeSetting, register

__all__ = ["LORA", "LoRAConfig", "input_dropout", "uses_dropout"]

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig(AdapterConfig):
    """Configuration of LoRA adapters.

    Attributes:
      target_modules: layers to adapt; query and value by default (the LoRA paper's GLUE setting).
      rank: the rank ``r`` of ``dW``.
      alpha: the delta is scaled by ``alpha / rank``.
      dropout: dropout rate on the adapter's input, active in training calls
        (those that carry a ``dropout`` rng).
      (See :class:`~cdvft_jax.config.AdapterConfig` for the other fields.)

    Example:
      >>> cfg = LoRAConfig(rank=8, alpha=16, modules_to_save=["classifier"])
      >>> cfg.scaling
      2.0
      >>> LORA.num_params(768, 768, cfg)
      12288
    """

    method: ClassVar[str] = "lora"

    target_modules: ModulePatterns = ("query", "value")
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int(self.rank, "rank")
        check_dropout(self.dropout)
        super().__post_init__()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def adapter_method(self) -> AdapterMethod:
        return LORA


def input_dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """``x`` as float32 with inverted dropout at ``rate`` applied when an ``rng`` is given."""
    x = x.astype(jnp.float32)
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _param_shapes(d_in: int, d_out: int, config: LoRAConfig, layer: str = "<layer>") -> dict:
    del layer  # every rank fits every layer
    return {"lora_a": (d_in, config.rank), "lora_b": (config.rank, d_out)}


def _init(key: jax.Array, d_in: int, d_out: int, config: LoRAConfig, layer: str = "<layer>") -> dict:
    del layer
    bound = 1.0 / d_in**0.5
    return {
        "lora_a": jax.random.uniform(key, (d_in, config.rank), jnp.float32, -bound, bound),
        "lora_b": jnp.zeros((config.rank, d_out), jnp.float32),
    }


def _delta(params: LayerParams, x: jax.Array, d_out: int, config: LoRAConfig, rng: jax.Array | None) -> jax.Array:
    del d_out
    x = input_dropout(x, config.dropout, rng)
    return (x @ params["lora_a"]) @ params["lora_b"]


def _delta_weight(params: LayerParams, d_in: int, d_out: int, config: LoRAConfig) -> jax.Array:
    del d_in, d_out, config
    return jnp.matmul(params["lora_a"], params["lora_b"], precision=_HIGHEST)


def _flops_per_token(d_in: int, d_out: int, config: LoRAConfig, layer: str = "<layer>") -> float:
    """Two matmuls, a multiply-add counted as 2 flops: ``2 r (d_in + d_out)``."""
    del layer
    return 2.0 * config.rank * (d_in + d_out)


def uses_dropout(config: AdapterConfig) -> bool:
    """``needs_rng`` of the methods with input dropout: whether ``config.dropout`` is above zero."""
    return config.dropout > 0.0


LORA = AdapterMethod(
    name="lora",
    param_prefix="lora_",
    param_shapes=_param_shapes,
    init=_init,
    delta=_delta,
    delta_weight=_delta_weight,
    flops_per_token=_flops_per_token,
    needs_rng=uses_dropout,
    learning_rate=5e-4,  # the paper's RoBERTa-base GLUE rate
)
"""The LoRA :class:`~cdvft_jax.methods.AdapterMethod`."""

register(
    MethodSpec(
        LORA,
        LoRAConfig,
        sizes=(SizeSetting("rank", "the rank r of dW = A @ B"),),
        # The papers' settings, for the benchmarks.
        paper_settings={"roberta-base": {"rank": 8, "alpha": 8.0}, "vit-base": {"rank": 16, "alpha": 16.0}},
    )
)
