"""What an adapter method is, and the registry of the methods there are.

The injection, training, merge, save and sharding code only ever talks to an
:class:`AdapterMethod`, a handful of pure functions of a layer's shape, so a new
method is one module that defines an ``AdapterMethod``, its
:class:`~cdvft_jax.config.AdapterConfig` subclass, and registers both with
:func:`register` as a :class:`MethodSpec`.  The registry is the one place the
programs and benchmarks learn a method's name, config class, default learning
rate and size settings from.  Every function receives the layer's resolved
config (overrides applied); those that look at a layer's shape also receive its
name, for error messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import jax

if TYPE_CHECKING:
    from cdvft_jax.config import AdapterConfig

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
    "never_random",
    "no_flops_per_step",
    "register",
]

LayerParams = Mapping[str, jax.Array]
"""One layer's adapter parameters, keyed by leaf name (all start with the method's prefix)."""


class ParamShapesFn(Protocol):
    """``(d_in, d_out, config, layer) -> {leaf: shape}``; raises ``ValueError`` naming ``layer`` when the
    config does not fit it."""

    def __call__(self, d_in: int, d_out: int, config: Any, layer: str = ..., /) -> dict[str, tuple[int, ...]]: ...


class InitFn(Protocol):
    """``(key, d_in, d_out, config, layer) -> {leaf: float32 array}``."""

    def __call__(self, key: jax.Array, d_in: int, d_out: int, config: Any, layer: str = ..., /) -> dict: ...


class DeltaFn(Protocol):
    """``(params, x, d_out, config, rng) -> float32 (..., d_out)``: the unscaled ``x @ dW`` on activations."""

    def __call__(
        self, params: LayerParams, x: jax.Array, d_out: int, config: Any, rng: jax.Array | None, /
    ) -> jax.Array: ...


class DeltaWeightFn(Protocol):
    """``(params, d_in, d_out, config) -> float32 (d_in, d_out)``: the unscaled dense ``dW``, Flax layout."""

    def __call__(self, params: LayerParams, d_in: int, d_out: int, config: Any, /) -> jax.Array: ...


class FlopsFn(Protocol):
    """``(d_in, d_out, config, layer) -> float``: analytic flops (per token, or per forward pass)."""

    def __call__(self, d_in: int, d_out: int, config: Any, layer: str = ..., /) -> float: ...


class NeedsRngFn(Protocol):
    """``config -> bool``: whether the delta wants an rng in training (e.g. for dropout)."""

    def __call__(self, config: Any, /) -> bool: ...


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
    param_shapes: ParamShapesFn
    init: InitFn
    delta: DeltaFn
    delta_weight: DeltaWeightFn
    flops_per_token: FlopsFn
    frozen_leaves: frozenset[str] = frozenset()
    needs_rng: NeedsRngFn = never_random
    flops_per_step: FlopsFn = no_flops_per_step
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


class SizeSetting(NamedTuple):
    """A config field that sizes a method, offered by the programs as a flag (``rank`` -> ``--rank``).

    Attributes:
      field: the config field (and the programs' setting of the same name).
      help: what it sets, for the flag's help; the default comes from the config class.
    """

    field: str
    help: str


class MethodSpec(NamedTuple):
    """Everything the programs and benchmarks need to know about a method, stated once in its module.

    Attributes:
      method: the :class:`AdapterMethod` (its ``name`` names the method everywhere).
      config_class: its :class:`~cdvft_jax.config.AdapterConfig` subclass.
      sizes: the config fields the programs expose as flags.
      paper_settings: ``{model kind: config fields}`` of the papers' settings, e.g.
        ``{"roberta-base": {"rank": 8, "alpha": 8.0}}``, used by the benchmarks.
      target_modules: the layers the encoder programs (``train.text``, ``train.image``) adapt when no
        ``--target-modules`` is given: the query and value projections (the papers' GLUE and ViT
        setting) unless a method states otherwise; ``("all-linear",)`` is every linear layer but the
        output head (:data:`~cdvft_jax.config.ALL_LINEAR`).
    """

    method: AdapterMethod
    config_class: type[AdapterConfig]
    sizes: tuple[SizeSetting, ...] = ()
    paper_settings: Mapping[str, Mapping[str, Any]] = {}
    target_modules: tuple[str, ...] = ("query", "value")

    @property
    def name(self) -> str:
        """The method's name."""
        return self.method.name

    def default(self, field: str) -> Any:
        """The config class's default of ``field``."""
        return self.config_class.__dataclass_fields__[field].default


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Adds a method to the registry (done once by the method's own module) and returns ``spec``.

    Raises:
      ValueError: if the name is taken by another method, the config class names another method,
        or a size is not a field of the config class.
    """
    name = spec.method.name
    if spec.config_class.method != name:
        raise ValueError(f"{spec.config_class.__name__}.method is {spec.config_class.method!r}, not {name!r}")
    unknown = [s.field for s in spec.sizes if s.field not in spec.config_class.__dataclass_fields__]
    if unknown:
        raise ValueError(f"{name}: sizes {unknown} are not fields of {spec.config_class.__name__}")
    if name in _REGISTRY and _REGISTRY[name] != spec:
        raise ValueError(f"adapter method {name!r} is already registered")
    _REGISTRY[name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    """The registered method called ``name``.

    Raises:
      ValueError: naming the registered methods, if there is none of that name.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown adapter method {name!r}; known methods: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order (CDVFT first)."""
    return tuple(_REGISTRY)
