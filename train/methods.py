"""The one set-up path of a fine-tuning method: what trains, with which optimizer, under which loss.

:func:`build_method` turns a method name (an adapter method of the library's registry, or ``head`` /
``full``) and a Hugging Face Flax model into a :class:`MethodSetup`: the trainable/frozen split, the
optimizer and the function that applies the model.  :func:`make_loss` and :func:`make_predict` are the
loss and prediction on :class:`Batch`es.  The training programs (``train.loop``) and the benchmarks
(``benchmarks.common.method_parts``) both build their runs here, so a run is set up one way everywhere.

"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cdvft_jax
from cdvft_jax.config import matches_within
from cdvft_jax.params import Params

__all__ = [
    "ADAPTER_METHODS",
    "DEFAULT_LEARNING_RATES",
    "FULL_LEARNING_RATE",
    "HEAD_LEARNING_RATE",
    "METHODS",
    "METHOD_SIZES",
    "PLAIN_METHODS",
    "Batch",
    "MethodSetup",
    "build_method",
    "default_learning_rate",
    "head_predicate",
    "make_loss",
    "make_predict",
    "schedule",
]

# The adapter methods come from the library's registry; ``head`` and ``full`` are the programs' own.
ADAPTER_METHODS = cdvft_jax.method_names()
PLAIN_METHODS = ("head", "full")
METHODS = (*ADAPTER_METHODS, *PLAIN_METHODS)
FULL_LEARNING_RATE = 2e-5
HEAD_LEARNING_RATE = 5e-3  # the classifier head's peak rate (every method's, unless a flag sets one)
# Peak learning rate of the adapter leaves (of every weight for ``full``) when no flag sets one: each
# adapter method's own (``AdapterMethod.learning_rate``); ``head`` trains at the head rate.
DEFAULT_LEARNING_RATES = {
    **{name: cdvft_jax.method_spec(name).method.learning_rate for name in ADAPTER_METHODS},
    "full": FULL_LEARNING_RATE,
}
# The settings (named like the config fields they set) that size each adapter method.
METHOD_SIZES = {name: tuple(s.field for s in cdvft_jax.method_spec(name).sizes) for name in ADAPTER_METHODS}


def default_learning_rate(method: str) -> float:
    """The peak learning rate of ``method`` when no flag sets one (``head`` uses the head rate, not this).

    Raises:
      SystemExit: ``method`` is not one of :data:`METHODS`.
    """
    if method not in METHODS:
        raise SystemExit(f"unknown --method {method!r}; choose from {', '.join(METHODS)}")
    # head trains the head alone, at the head rate; its adapter rate is unused and recorded as that rate.
    return DEFAULT_LEARNING_RATES.get(method, HEAD_LEARNING_RATE)


class Batch(NamedTuple):
    """One batch: model keyword inputs, labels, and weights (0 for rows that only fill the last eval batch)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    weights: np.ndarray


class MethodSetup(NamedTuple):
    """What a fine-tuning method hands a training loop.

    Attributes:
      apply: ``apply(**inputs, params=..., train=..., dropout_rng=...)``: the adapted model, or the model.
      trainable: the params that train.
      frozen: the rest.
      optimizer: the optimizer of ``trainable``.
      describe: a one-line summary of the trainable params.
      adapted: the :class:`~cdvft_jax.AdaptedModel` of an adapter method (``None`` otherwise).
    """

    apply: Callable[..., Any]
    trainable: Params
    frozen: Params
    optimizer: optax.GradientTransformation
    describe: str
    adapted: cdvft_jax.AdaptedModel | None = None


def schedule(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warm-up over ``warmup_ratio`` of the steps (at least one), then linear decay to zero.

    >>> rates = schedule(1.0, total_steps=10, warmup_ratio=0.2)
    >>> [round(float(rates(step)), 3) for step in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    warmup = max(1, round(warmup_ratio * total_steps))
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, warmup),
            optax.linear_schedule(peak, 0.0, max(1, total_steps - warmup)),
        ],
        [warmup],
    )


def head_predicate(head_modules: Sequence[str]) -> Callable[[str], bool]:
    """Whether a ``/``-joined param path lies in one of ``head_modules`` (as ``modules_to_save`` matches)."""
    return lambda path: matches_within(path, head_modules)


def build_method(
    name: str,
    model: Any,
    *,
    learning_rate: float | optax.Schedule,
    head_learning_rate: float | optax.Schedule,
    config: cdvft_jax.AdapterConfig | None = None,
    head_modules: Sequence[str] = ("classifier",),
    weight_decay: float = 0.0,
    seed: int = 0,
    trains: Callable[[str], bool] | None = None,
) -> MethodSetup:
    """The trainable/frozen split, optimizer and apply function of method ``name`` for ``model``.

    Args:
      name: an adapter method (one of :data:`ADAPTER_METHODS`), ``head`` or ``full``, or any other
        name together with ``trains``.
      model: a Hugging Face Flax model with its params.
      learning_rate: AdamW's rate (a number or a schedule) of the adapter leaves; of every weight for
        ``full`` and of the ``trains`` leaves.
      head_learning_rate: the rate of the head (``config.modules_to_save``; ``head_modules`` for ``head``).
      config: the adapter config of an adapter method (its ``method`` must be ``name``).
      head_modules: the modules ``head`` trains.
      weight_decay: AdamW's decoupled weight decay, for every method.
      seed: seeds the adapter's init.
      trains: for a method of another name (a benchmark's), the paths it trains, all at ``learning_rate``.

    Raises:
      ValueError: a name that is none of these, or an adapter method without its config.
    """
    if name in ADAPTER_METHODS:
        if config is None or config.method != name:
            raise ValueError(f"method {name!r} needs its adapter config, got {config!r}")
        adapted = cdvft_jax.inject(model, config)
        params = adapted.init(jax.random.key(seed), model.params)
        trainable, frozen = adapted.split(params)
        optimizer = cdvft_jax.adapter_optimizer(
            adapted,
            adapter_learning_rate=learning_rate,
            head_learning_rate=head_learning_rate,
            weight_decay=weight_decay,
        )
        return MethodSetup(adapted, trainable, frozen, optimizer, str(adapted.summary(params)), adapted)
    if name == "head":
        trainable, frozen = cdvft_jax.split_params(model.params, head_predicate(head_modules))
        optimizer = optax.adamw(head_learning_rate, weight_decay=weight_decay)
    elif name == "full" or trains is not None:
        trainable, frozen = cdvft_jax.split_params(model.params, trains or (lambda path: True))
        optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    count = cdvft_jax.count_params(trainable)
    total = count + cdvft_jax.count_params(frozen)
    return MethodSetup(model.__call__, trainable, frozen, optimizer, f"trainable params: {count:,} of {total:,}")


def make_loss(
    apply: Callable[..., Any], *, regression: bool = False, dropout: bool = True
) -> Callable[[Params, Batch, jax.Array], jax.Array]:
    """``loss(params, batch, rng)``: mean cross-entropy (squared error for ``regression``) over
    ``batch.weights``.  With ``dropout`` the model runs in training mode on the step's ``rng``; without,
    deterministically (the benchmarks time steps without dropout)."""

    def loss_fn(params: Params, batch: Batch, rng: jax.Array) -> jax.Array:
        if dropout:
            logits = apply(**batch.inputs, params=params, train=True, dropout_rng=rng).logits
        else:
            logits = apply(**batch.inputs, params=params, train=False).logits
        if regression:
            per_example = (logits[:, 0] - batch.labels) ** 2
        else:
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
        return jnp.sum(per_example * batch.weights) / jnp.maximum(jnp.sum(batch.weights), 1.0)

    return loss_fn


def make_predict(apply: Callable[..., Any], *, regression: bool = False) -> Callable[[Params, Batch], jax.Array]:
    """``predict(params, batch)``: class ids, or scores for ``regression``."""

    def predict(params: Params, batch: Batch) -> jax.Array:
        logits = apply(**batch.inputs, params=params, train=False).logits
        return logits[:, 0] if regression else jnp.argmax(logits, axis=-1)

    return predict
