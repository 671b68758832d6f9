"""The linear layer kinds adapters attach to, and the layer records shared by injection, merge and export.

A leaf module (it imports nothing of the library but the config type), so that ``injection``,
``merge`` and ``layers`` can all depend on it without depending on each other.

Every kind of linear layer is one :class:`LinearKind` entry of :data:`LINEAR_KINDS`: how to recognise
the module, its output width, and how its ``kernel`` is stored.  Adapter methods always work in Flax's
``(d_in, d_out)`` layout; :func:`flax_layout` translates for the kinds that store it otherwise (GPT-2's
``FlaxConv1D`` stores ``(d_out, d_in)``).  A new kind is one entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import flax.linen as nn

if TYPE_CHECKING:
    from cdvft_jax.config import AdapterConfig

__all__ = [
    "LINEAR_KINDS",
    "AdaptedLayer",
    "AdapterLayerMarker",
    "KernelLayout",
    "LinearKind",
    "LinearLayer",
    "flax_layout",
    "linear_kind",
]

KernelLayout = Literal["in_out", "out_in"]
"""How a kind stores its 2-D ``kernel``: ``(d_in, d_out)`` (``nn.Dense``) or ``(d_out, d_in)``."""


class AdapterLayerMarker:
    """Mixin for modules that carry their own adapter; injection leaves them alone."""


class LinearKind(NamedTuple):
    """One kind of linear layer ``y = x @ W + b`` (``W`` Flax-layout) that adapters can wrap.

    Attributes:
      name: short name, shown by :meth:`~cdvft_jax.AdaptedModel.describe`.
      is_kind: whether a module is of this kind (its ``__call__`` takes the input as its first argument).
      features: the module's output width ``d_out``.
      kernel_layout: how its ``kernel`` param is stored.
    """

    name: str
    is_kind: Callable[[nn.Module], bool]
    features: Callable[[nn.Module], int]
    kernel_layout: KernelLayout


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    # Matched by class name so that the table does not import transformers' GPT-2 module.
    cls = type(module)
    return cls.__name__ == "FlaxConv1D" and cls.__module__.startswith("transformers.")


LINEAR_KINDS: tuple[LinearKind, ...] = (
    LinearKind("dense", lambda m: isinstance(m, nn.Dense), lambda m: m.features, "in_out"),
    # transformers' GPT-2 ``FlaxConv1D`` (``c_attn``, ``c_proj``, ``c_fc``): a linear layer whose kernel is
    # stored (features, d_in) and applied as x @ kernel.T.
    LinearKind("conv1d", _is_gpt2_conv1d, lambda m: m.features, "out_in"),
)
"""The linear layer kinds injection recognises, first match wins."""


def linear_kind(module: nn.Module) -> LinearKind | None:
    """The :class:`LinearKind` of ``module``, or ``None`` (not linear, or it carries its own adapter)."""
    if isinstance(module, AdapterLayerMarker):
        return None
    return next((kind for kind in LINEAR_KINDS if kind.is_kind(module)), None)


def flax_layout(kernel: Any, layout: KernelLayout) -> Any:
    """A kernel stored in ``layout`` as ``(d_in, d_out)``, the layout of adapter methods' ``dW``.

    Its own inverse (a transpose or nothing), so it also turns a ``(d_in, d_out)`` array back into
    the layer's layout.
    """
    return kernel if layout == "in_out" else kernel.T


class LinearLayer(NamedTuple):
    """A linear layer seen in a model: its module path, shape and kernel layout."""

    path: str
    d_in: int
    d_out: int
    kind: str
    kernel_layout: KernelLayout

    @property
    def kernel_shape(self) -> tuple[int, int]:
        """The shape its ``kernel`` param is stored with."""
        return (self.d_in, self.d_out) if self.kernel_layout == "in_out" else (self.d_out, self.d_in)


class AdaptedLayer(NamedTuple):
    """A layer that carries an adapter.

    Attributes:
      path: module path, ``/``-joined.
      d_in: input features.
      d_out: output features.
      config: the config with this layer's overrides applied.
      param_shapes: ``{leaf name: shape}`` of its adapter parameters.
      kernel_layout: how the layer stores its ``kernel`` (see :data:`KernelLayout`).
    """

    path: str
    d_in: int
    d_out: int
    config: AdapterConfig
    param_shapes: Mapping[str, tuple[int, ...]]
    kernel_layout: KernelLayout
