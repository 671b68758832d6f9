"""Adapter methods: the :class:`AdapterMethod` contract, the registry, and one module per method.

* :mod:`cdvft_jax.methods.base`: the contract (typed ``Protocol``s for its functions) and the registry;
* :mod:`cdvft_jax.methods.cdvft`, :mod:`~cdvft_jax.methods.lora`, :mod:`~cdvft_jax.methods.vera`,
  :mod:`~cdvft_jax.methods.fourierft`, :mod:`~cdvft_jax.methods.c3a`: one method each; importing
  ``cdvft_jax`` registers them all.

A new method is one module here that ends with ``register(MethodSpec(...))``, plus its import in
``cdvft_jax/__init__.py``.
"""

from cdvft_jax.methods.base import (
    AdapterMethod,
    DeltaFn,
    DeltaWeightFn,
    FlopsFn,
    InitFn,
    LayerParams,
    MethodSpec,
    NeedsRngFn,
    ParamShapesFn,
    SizeSetting,
    method_names,
    method_spec,
    register,
)

__all__ = [
    "AdapterMethod",
    "DeltaFn",
    "DeltaWeightFn",
    "FlopsFn",
    "InitFn",
    "LayerParams",
    "MethodSpec",
    "NeedsRngFn",
    "ParamShapesFn",
    "SizeSetting",
    "method_names",
    "method_spec",
    "register",
]
