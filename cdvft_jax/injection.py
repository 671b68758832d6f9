"""Adapting unmodified Flax models, Hugging Face's included, with method interception.

:func:`inject` runs the model once abstractly (``jax.eval_shape``, nothing is
allocated) to find every linear layer (``nn.Dense``, GPT-2's ``FlaxConv1D``: the kinds of
:data:`~cdvft_jax.layer_types.LINEAR_KINDS`) and its shape, matches them against
the config and returns an :class:`AdaptedModel`.  Calling the adapted model runs
the original model under :func:`flax.linen.intercept_methods`: each targeted
linear layer computes its usual output and adds ``scaling * delta(x)``, reading
the adapter leaves from its own scope (``.../query/cdv_a_in`` beside
``.../query/kernel``).  The model's code is never edited, so gradient
checkpointing (``nn.remat``) and reduced-precision compute keep working.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from transformers import BertConfig, FlaxBertForSequenceClassification
  >>> import cdvft_jax
  >>> model = FlaxBertForSequenceClassification(BertConfig(
  ...     vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
  ...     intermediate_size=37))
  >>> adapted = cdvft_jax.inject(model, cdvft_jax.CDVFTConfig(modules_to_save=["classifier"]))
  >>> params = adapted.init(jax.random.key(0), model.params)
  >>> trainable, frozen = adapted.split(params)
  >>> ids = jnp.ones((1, 8), jnp.int32)
  >>> bool(jnp.array_equal(adapted(ids, params=params).logits, model(ids).logits))
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from cdvft_jax.config import ALL_LINEAR, AdapterConfig, matches, matches_within
from cdvft_jax.layer_types import AdaptedLayer, LinearLayer, linear_kind
from cdvft_jax.merge import fold_adapters
from cdvft_jax.params import Params, count_params, flat_params, merge_params, split_params, unflat_params
from cdvft_jax.params import check_finite as check_finite_params

__all__ = [
    "AdaptedLayer",
    "AdaptedModel",
    "AdapterRows",
    "LinearLayer",
    "TrainableSummary",
    "find_linear_layers",
    "inject",
]


class TrainableSummary(NamedTuple):
    """Parameter counts of an adapted model."""

    adapter: int
    modules_to_save: int
    frozen: int

    @property
    def trainable(self) -> int:
        return self.adapter + self.modules_to_save

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"trainable params: {self.trainable:,} (adapter {self.adapter:,} + "
            f"modules_to_save {self.modules_to_save:,}) || all params: {self.total:,} "
            f"|| trainable%: {share:.4f}"
        )


def _is_linear_call(context: Any) -> bool:
    return context.method_name == "__call__" and linear_kind(context.module) is not None


def _linear_input(args: tuple, kwargs: dict) -> jax.Array:
    return args[0] if args else kwargs["inputs"]


def find_linear_layers(init_fn: Callable[[], Params]) -> tuple[dict[str, LinearLayer], dict[str, Any]]:
    """Runs ``init_fn`` abstractly and records every call of a linear layer (see ``LINEAR_KINDS``)
    that owns its kernel (a tied output head, which borrows the embedding, is left out).

    Args:
      init_fn: a zero-argument function that runs the model (typically its
        ``init``) and returns its params tree.

    Returns:
      ``({path: LinearLayer}, {param path: ShapeDtypeStruct})`` in call order.
    """
    found: dict[str, LinearLayer] = {}

    def record(next_fun, args, kwargs, context):
        if _is_linear_call(context):
            module = context.module
            kind = linear_kind(module)
            path = "/".join(module.path)
            d_in = _linear_input(args, kwargs).shape[-1]
            found.setdefault(path, LinearLayer(path, d_in, kind.features(module), kind.name, kind.kernel_layout))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(init_fn)
    flat = flat_params(shapes)
    # A layer run with borrowed weights has no kernel of its own in the tree: a tied output head
    # (GPT-2, Gemma) applies the token embedding through a detached Dense.
    return {path: layer for path, layer in found.items() if f"{path}/kernel" in flat}, flat


@dataclasses.dataclass(frozen=True, eq=False)
class AdaptedModel:
    """An unmodified Flax model plus adapters on the layers a config selects.

    Build it with :func:`inject`.  Parameters live in one nested tree (the
    base model's plus the adapter leaves); :meth:`split` separates the
    trainable part from the frozen one for training.

    Attributes:
      config: the adapter config.
      apply_fn: calls the unmodified model, ``apply_fn(*args, params=..., **kwargs)``.
      linear_layers: every linear layer in the model, by path.
      layers: the adapted layers, by path.
      base_shapes: ``{param path: ShapeDtypeStruct}`` of the base model.
      model_class: class name of the model injected into (e.g. ``FlaxRobertaForSequenceClassification``).
    """

    config: AdapterConfig
    apply_fn: Callable[..., Any]
    linear_layers: Mapping[str, LinearLayer]
    layers: Mapping[str, AdaptedLayer]
    base_shapes: Mapping[str, Any]
    model_class: str

    @property
    def method(self):
        """The :class:`~cdvft_jax.methods.AdapterMethod` of the config."""
        return self.config.adapter_method

    def _interceptor(self, next_fun, args, kwargs, context):
        module = context.module
        layer = self.layers.get("/".join(module.path)) if _is_linear_call(context) else None
        # While a model initialises (a decoder's generation cache, say) it creates its own params, never ours.
        if layer is None or module.is_initializing():
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        missing = [n for n in layer.param_shapes if not module.has_variable("params", n)]
        if missing:
            raise ValueError(
                f"layer {layer.path!r} is adapted but its params have no {missing}; "
                "build params with AdaptedModel.init(key, base_params) or load an adapter"
            )
        leaves = {n: module.get_variable("params", n) for n in layer.param_shapes}
        # Training calls of Hugging Face models carry a dropout rng; evaluation calls do not.
        wants_rng = self.method.needs_rng(layer.config) and module.scope.has_rng("dropout")
        rng = module.make_rng("dropout") if wants_rng else None
        delta = self.method.delta(leaves, _linear_input(args, kwargs), layer.d_out, layer.config, rng)
        return y + (layer.config.scaling * delta).astype(y.dtype)

    def _stacked_interceptor(self, rows: AdapterRows, next_fun, args, kwargs, context):
        # Row b of the batch runs adapter rows.index[b]: its adapter leaves and head are gathered per row.
        module = context.module
        if not _is_linear_call(context) or module.is_initializing():  # see _interceptor
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        x = _linear_input(args, kwargs)
        if path in self.layers:
            layer = self.layers[path]
            rows.check_batch(x, path)
            y = next_fun(*args, **kwargs)  # the frozen kernel is the same for every row
            frozen = self.method.frozen_leaves
            shared = {n: module.get_variable("params", n) for n in layer.param_shapes if n in frozen}
            own = {n: rows.gather(module.get_variable("params", n)) for n in layer.param_shapes if n not in frozen}
            if self.method.needs_rng(layer.config) and module.scope.has_rng("dropout"):
                raise ValueError(
                    f"stacked adapters run deterministically (inference), but layer {path!r} has adapter dropout "
                    "and the call a dropout rng: call the model with train=False (or without a dropout rng)"
                )

            def row_delta(leaves, x_row):
                return self.method.delta(shared | leaves, x_row, layer.d_out, layer.config, None)

            x_rows = x.reshape(x.shape[0], -1, layer.d_in)
            delta = jax.vmap(row_delta)(own, x_rows)
            delta = jnp.where(rows.active[:, None, None], delta, 0.0)  # base rows (id -1) get no delta
            return y + (layer.config.scaling * delta.reshape(y.shape)).astype(y.dtype)
        if self.config.in_modules_to_save(path):  # a head layer: one per adapter
            rows.check_batch(x, path)
            return _per_row_dense(module, x, rows)
        return next_fun(*args, **kwargs)

    def adapter_rows(self, params: Params, adapter_ids: Any) -> AdapterRows:
        """Checks ``params`` holds stacked adapters (:func:`~cdvft_jax.stack_adapters`) and ``adapter_ids``
        their indices, one per batch row, -1 for the base model; returns the rows' gather plan.

        Raises:
          ValueError: a trainable leaf lacks the leading adapter axis or the stacks differ in size, a
            ``modules_to_save`` leaf is not an ``nn.Dense`` layer's, ``adapter_ids`` is not 1-D, or (when
            the ids are concrete, outside ``jit``) an id lies outside ``[-1, N)``.  Under ``jit`` an id
            out of range is not clamped: its rows come out NaN.
        """
        flat = flat_params(params)
        count = None
        for path, shape in self._trainable_shapes.items():
            leaf = flat.get(path)
            if leaf is None:
                raise ValueError(f"params lack the trainable leaf {path!r}; stack adapters with stack_adapters")
            if tuple(leaf.shape[1:]) != shape or (count is not None and leaf.shape[0] != count):
                expected = f"(N, {', '.join(map(str, shape))})" if count is None else str((count, *shape))
                raise ValueError(
                    f"adapter_ids needs stacked adapters (stack_adapters): {path!r} has shape "
                    f"{tuple(leaf.shape)}, expected {expected}"
                )
            count = leaf.shape[0]
        for path in self._trainable_shapes:
            module = path.rpartition("/")[0]
            linear = self.linear_layers.get(module)
            if not self.is_adapter_leaf(path) and (linear is None or linear.kind != "dense"):
                raise ValueError(
                    f"stacked adapters run per-row heads made of nn.Dense layers only; {path!r} is not a Dense "
                    "layer's (keep such modules out of modules_to_save to stack adapters)"
                )
        try:  # concrete ids are checked here; traced ones (inside jit) only by their NaN rows
            concrete = np.asarray(adapter_ids)
        except jax.errors.TracerArrayConversionError:
            concrete = None
        ids = jnp.asarray(adapter_ids)
        if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(
                f"adapter_ids must be a 1-D integer array (one id per batch row), got {ids.dtype}{list(ids.shape)}"
            )
        if concrete is not None and concrete.size:
            low, high = int(concrete.min()), int(concrete.max())
            if low < -1 or high >= count:
                raise ValueError(f"adapter_ids must lie in [-1, {count}) (-1: the base model), got {low}..{high}")
        # -1 reads adapter 0 (its head; the delta is masked out); any other id outside [0, N) reads NaN.
        index = jnp.where(ids == -1, 0, jnp.where(ids < 0, count, ids))
        return AdapterRows(index, ids != -1, count)

    @contextlib.contextmanager
    def intercept(self, rows: AdapterRows | None = None) -> Iterator[None]:
        """Context in which every call of the model's modules is adapted.

        Use it to adapt a call that :meth:`__call__` does not cover, e.g.
        ``module.apply`` with extra variable collections, or a Hugging Face
        model's own ``generate``.  With ``rows`` (:meth:`adapter_rows`), each
        batch row runs its own stacked adapter.  A module that is initialising
        (``init``, e.g. a decoder's key-value cache set-up) runs unadapted: it
        creates its own variables and the adapter's are not among them.
        """
        interceptor = self._interceptor if rows is None else functools.partial(self._stacked_interceptor, rows)
        with nn.intercept_methods(interceptor):
            yield

    def __call__(self, *args: Any, params: Params, adapter_ids: Any = None, **kwargs: Any) -> Any:
        """Runs the adapted model: ``apply_fn(*args, params=params, **kwargs)`` under interception.

        With ``adapter_ids`` (one int per batch row; every layer must see the batch on axis 0, as
        Hugging Face models do), ``params`` holds N stacked adapters
        (:func:`~cdvft_jax.stack_adapters` merged with the frozen tree) and row ``b`` runs adapter
        ``adapter_ids[b]`` with its head; ``-1`` runs the base model with adapter 0's head.  Each row
        gathers its own adapter leaves, so the work per row does not grow with N.
        """
        rows = None if adapter_ids is None else self.adapter_rows(params, adapter_ids)
        with self.intercept(rows):
            return self.apply_fn(*args, params=params, **kwargs)

    def trainable_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{param path: shape}`` of every trainable leaf: the adapter leaves (but a method's frozen
        ones) and the base leaves inside ``modules_to_save``; what an adapter file stores."""
        return dict(self._trainable_shapes)

    @functools.cached_property
    def _trainable_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {
            f"{path}/{name}": tuple(shape)
            for path, layer in self.layers.items()
            for name, shape in layer.param_shapes.items()
            if name not in self.method.frozen_leaves
        }
        shapes.update(
            (path, tuple(leaf.shape)) for path, leaf in self.base_shapes.items() if self.config.in_modules_to_save(path)
        )
        return shapes

    def init_adapter(self, key: jax.Array) -> dict:
        """A tree holding only the adapter leaves, initialised by the config's scheme.

        Each layer's key is ``fold_in(key, crc32(path))``, so a layer's
        initial values do not depend on which other layers are adapted.
        """
        flat = {}
        for path, layer in self.layers.items():
            layer_key = jax.random.fold_in(key, zlib.crc32(path.encode()))
            leaves = self.method.init(layer_key, layer.d_in, layer.d_out, layer.config, path)
            flat.update({f"{path}/{name}": value for name, value in leaves.items()})
        return unflat_params(flat)

    def init(self, key: jax.Array, base_params: Params) -> dict:
        """``base_params`` plus freshly initialised adapter leaves, in one tree.

        Raises:
          ValueError: if ``base_params`` does not fit the model the adapter
            was injected into, or already holds adapter leaves.
        """
        self._check_base(base_params)
        return merge_params(base_params, self.init_adapter(key))

    def _check_base(self, base_params: Params) -> None:
        flat = flat_params(base_params)
        for path in self.layers:
            kernel = flat.get(f"{path}/kernel")
            expected = self.linear_layers[path].kernel_shape
            if kernel is None or tuple(kernel.shape) != expected:
                got = None if kernel is None else tuple(kernel.shape)
                raise ValueError(
                    f"base params do not fit the injected model: {path}/kernel should have shape {expected}, got {got}"
                )
        present = sorted(p for p in flat if self.is_adapter_leaf(p))
        if present:
            raise ValueError(f"base params already hold adapter leaves, e.g. {present[:3]}")

    def is_adapter_leaf(self, path: str) -> bool:
        """Whether the parameter at ``path`` is an adapter leaf of an adapted layer."""
        module_path, _, name = path.rpartition("/")
        layer = self.layers.get(module_path)
        return layer is not None and name in layer.param_shapes

    def is_frozen_adapter_leaf(self, path: str) -> bool:
        """Whether ``path`` is an adapter leaf the method keeps frozen (e.g. VeRA's random projections)."""
        return self.is_adapter_leaf(path) and path.rpartition("/")[2] in self.method.frozen_leaves

    def is_trainable(self, path: str) -> bool:
        """Adapter leaves (but a method's frozen ones) and everything inside ``modules_to_save`` train."""
        if self.is_adapter_leaf(path):
            return not self.is_frozen_adapter_leaf(path)
        return self.config.in_modules_to_save(path)

    def frozen_adapter_params(self) -> dict:
        """A tree of the method's frozen adapter leaves (empty for most methods).

        They depend on the config alone, so :func:`~cdvft_jax.load_adapter`
        rebuilds them instead of reading them from the adapter file.
        """
        if not self.method.frozen_leaves:
            return {}
        every_leaf = self.init_adapter(jax.random.key(0))
        return split_params(every_leaf, self.is_frozen_adapter_leaf)[0]

    def split(self, params: Params) -> tuple[dict, dict]:
        """``(trainable, frozen)``: disjoint trees; ``merge_params`` joins them back."""
        return split_params(params, self.is_trainable)

    def adapter_params(self, params: Params) -> dict:
        """Only the adapter leaves of ``params``."""
        return split_params(params, self.is_adapter_leaf)[0]

    def summary(self, params: Params) -> TrainableSummary:
        """Counts of adapter, ``modules_to_save`` and frozen parameters in ``params``."""
        adapter, rest = split_params(params, lambda p: self.is_adapter_leaf(p) and self.is_trainable(p))
        saved, frozen = split_params(rest, self.config.in_modules_to_save)
        return TrainableSummary(count_params(adapter), count_params(saved), count_params(frozen))

    def print_trainable_parameters(self, params: Params) -> None:
        """Prints :meth:`summary` in the familiar one-line form."""
        print(self.summary(params))

    def describe(self) -> str:
        """A table of every linear layer: its kind, shape, whether adapted and why not."""
        rows = [("module", "kind", "d_in x d_out", "status")]
        for path, linear in self.linear_layers.items():
            if path in self.layers:
                count = self.method.num_params(linear.d_in, linear.d_out, self.layers[path].config, path)
                status = f"adapted ({count:,} params)"
            elif self.config.in_modules_to_save(path):
                status = "in modules_to_save (trained in full)"
            elif self.config.selects(path):
                status = "excluded"
            else:
                status = "frozen"
            rows.append((path, linear.kind, f"{linear.d_in} x {linear.d_out}", status))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)

    def merge(self, params: Params, *, check_finite: bool = True) -> dict:
        """Base params with ``scaling * dW`` folded into each adapted kernel; adapter leaves removed.

        The result runs on the unmodified model (no interception) at no extra
        cost and gives the adapted model's outputs.  Folding is done in
        float32 and cast to each kernel's dtype.

        Args:
          params: base params plus every adapter leaf.
          check_finite: first refuse trainable leaves (adapter and head) that hold a NaN or an
            infinity, which would silently poison the merged kernels.  The check reads the values, so
            pass ``False`` when merging inside ``jit``.

        Raises:
          NonFiniteError: ``check_finite`` and a trainable leaf is not finite.
        """
        if check_finite:
            trainable = {path: leaf for path, leaf in flat_params(params).items() if self.is_trainable(path)}
            check_finite_params(trainable, "the adapter to merge")

        return fold_adapters(self.layers, params, sign=1.0, keep_adapter=False)

    def unmerge(self, merged_params: Params, adapter_params: Params) -> dict:
        """Inverse of :meth:`merge`: subtracts the deltas and puts the adapter leaves back."""
        return fold_adapters(self.layers, merge_params(merged_params, adapter_params), sign=-1.0, keep_adapter=True)


class AdapterRows(NamedTuple):
    """Which stacked adapter each batch row runs (:meth:`AdaptedModel.adapter_rows`).

    Attributes:
      index: ``(batch,)`` the adapter read per row (adapter 0 for a base row; ``count`` for an id out of
        range, which reads NaN).
      active: ``(batch,)`` bool, False for base rows (their delta is dropped, whatever its value).
      count: N, the number of stacked adapters.
    """

    index: jax.Array
    active: jax.Array
    count: int

    def gather(self, stacked: jax.Array) -> jax.Array:
        """Row ``b`` of the result is ``stacked[index[b]]``; an index out of range gives NaN, not a clamp."""
        return jnp.take(stacked, self.index, axis=0, mode="fill", fill_value=jnp.nan)

    def check_batch(self, x: jax.Array, path: str) -> None:
        """``x`` carries the batch on axis 0, one row per id."""
        if x.ndim < 2 or x.shape[0] != self.index.shape[0]:
            raise ValueError(
                f"adapter_ids has {self.index.shape[0]} ids but layer {path!r} sees an input of shape "
                f"{tuple(x.shape)}: stacked adapters need the batch on axis 0, one id per row"
            )


def _per_row_dense(module: nn.Dense, x: jax.Array, rows: AdapterRows) -> jax.Array:
    """``module``'s output with row ``b`` using the kernel and bias of stacked adapter ``rows.index[b]``.

    It computes ``x @ kernel + bias`` itself (``nn.Dense``'s promotion and precision), so a Dense with a
    custom ``dot_general`` is refused rather than silently run with the standard one.
    """
    if getattr(module, "dot_general", None) is not None or getattr(module, "dot_general_cls", None) is not None:
        raise ValueError(
            f"head layer {'/'.join(module.path)!r} has a custom dot_general, which stacked heads cannot reproduce"
        )
    kernel = rows.gather(module.get_variable("params", "kernel"))
    bias = rows.gather(module.get_variable("params", "bias")) if module.use_bias else None
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=module.dtype)
    x_rows = x.reshape(x.shape[0], -1, x.shape[-1])
    y = jnp.einsum("bti,bio->bto", x_rows, kernel, precision=module.precision)
    if bias is not None:
        y = y + bias[:, None, :]
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def _is_hf_model(model: Any) -> bool:
    return all(hasattr(model, a) for a in ("module", "init_weights", "input_shape", "config"))


def inject(model: Any, config: AdapterConfig, *sample_args: Any, **sample_kwargs: Any) -> AdaptedModel:
    """Finds the layers ``config`` selects in ``model`` and returns the :class:`AdaptedModel`.

    Args:
      model: a Hugging Face ``FlaxPreTrainedModel`` (its own ``init_weights``
        is traced), or a ``flax.linen.Module`` together with sample inputs
        for its ``init``.
      config: an adapter config, e.g. :class:`~cdvft_jax.CDVFTConfig`.
      *sample_args: sample positional inputs (linen modules only).
      **sample_kwargs: sample keyword inputs (linen modules only).

    Raises:
      ValueError: when a target pattern matches no linear layer, a
        target lies inside ``modules_to_save``, a ``modules_to_save`` pattern
        matches no parameter, or the config does not fit a layer's shape.
    """
    if _is_hf_model(model):
        if sample_args or sample_kwargs:
            raise ValueError("sample inputs are only needed for linen modules, not Hugging Face models")

        def init_fn():
            return model.init_weights(jax.random.PRNGKey(0), model.input_shape)

        apply_fn = model.__call__
    elif isinstance(model, nn.Module):
        if not (sample_args or sample_kwargs):
            raise ValueError("inject(module, config, *sample_inputs): a linen module needs sample inputs")

        def init_fn():
            return model.init(jax.random.PRNGKey(0), *sample_args, **sample_kwargs)["params"]

        def apply_fn(*args, params, **kwargs):
            return model.apply({"params": params}, *args, **kwargs)
    else:
        raise TypeError(f"expected a Hugging Face Flax model or a flax.linen.Module, got {type(model).__name__}")

    linear_layers, base_shapes = find_linear_layers(init_fn)
    _check_selection(config, linear_layers, base_shapes)
    layers = {}
    for path, linear in linear_layers.items():
        if config.is_target(path):
            layer_config = config.layer_config(path)
            shapes = layer_config.adapter_method.param_shapes(linear.d_in, linear.d_out, layer_config, path)
            layers[path] = AdaptedLayer(path, linear.d_in, linear.d_out, layer_config, shapes, linear.kernel_layout)
    return AdaptedModel(config, apply_fn, linear_layers, layers, base_shapes, type(model).__name__)


def _one_by_one(patterns: str | tuple[str, ...]) -> list[str | tuple[str]]:
    """A regex stays whole; a suffix list is split into single-suffix lists."""
    return [patterns] if isinstance(patterns, str) else [(p,) for p in patterns]


def _check_selection(config: AdapterConfig, linear_layers: Mapping[str, LinearLayer], base_shapes: Mapping) -> None:
    seen = list(linear_layers)
    examples = ", ".join(seen[:8]) + (", ..." if len(seen) > 8 else "")
    probes = [] if config.target_modules == ALL_LINEAR else _one_by_one(config.target_modules)
    for probe in probes:
        if not any(matches(p, probe) for p in seen):
            entry = probe if isinstance(probe, str) else probe[0]
            raise ValueError(
                f"target_modules entry {entry!r} matches no linear layer; the model's linear layers are: {examples}"
            )
    matched = [p for p in seen if config.selects(p)]
    if not matched:
        raise ValueError(
            f"target_modules={ALL_LINEAR!r} finds no linear layer outside the output heads and modules_to_save; "
            f"the model's linear layers are: {examples}"
        )
    for probe in _one_by_one(config.exclude_modules):
        if not any(matches(p, probe) for p in matched):
            entry = probe if isinstance(probe, str) else probe[0]
            raise ValueError(f"exclude_modules entry {entry!r} excludes none of the layers target_modules matches")
    targets = [p for p in seen if config.is_target(p)]
    if not targets:
        raise ValueError(
            f"every layer matched by target_modules is excluded by exclude_modules {config.exclude_modules!r}"
        )
    for pattern, _ in config.overrides:
        if not any(re.fullmatch(pattern, p) for p in targets):
            shown = ", ".join(targets[:4]) + (", ..." if len(targets) > 4 else "")
            raise ValueError(f"overrides pattern {pattern!r} matches no adapted layer; the adapted layers are: {shown}")
    inside = [p for p in targets if config.in_modules_to_save(p)]
    if inside:
        raise ValueError(
            f"target layers {inside[:4]} lie inside modules_to_save {config.modules_to_save!r}; "
            "a module is either adapted or trained in full, not both"
        )
    module_paths = {p.rpartition("/")[0] for p in base_shapes}
    for probe in _one_by_one(config.modules_to_save):
        if not any(matches_within(m, probe) for m in module_paths):
            entry = probe if isinstance(probe, str) else probe[0]
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model")
