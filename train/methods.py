"""The one set-up path of a fine-tuning method: what trains, with which optimizer, under which loss.

:func:`build_method` turns a method name (an adapter method of the library's registry, or ``head`` /
``full``) and a Hugging Face Flax model into a :class:`MethodSetup`: the trainable/frozen split, the
optimizer and the function that applies the model.  :func:`make_loss` and :func:`make_predict` are the
loss and prediction of a classifier on :class:`Batch`es; :func:`make_causal_lm_loss`,
:func:`make_token_nll` and :func:`make_generate` those of a causal language model.  An :class:`Objective`
bundles one kind (:func:`classification_objective`, :func:`causal_lm_objective`) for the training loop.
The training programs (``train.loop``) and the benchmarks (``benchmarks.common.method_parts``) both build
their runs here, so a run is set up one way everywhere.

"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cdvft_jax
from cdvft_jax.config import matches_within
from cdvft_jax.params import Params, flat_params, unflat_params

__all__ = [
    "ADAPTER_METHODS",
    "DEFAULT_LEARNING_RATES",
    "FULL_LEARNING_RATE",
    "HEAD_LEARNING_RATE",
    "IGNORE_INDEX",
    "METHODS",
    "METHOD_SIZES",
    "PLAIN_METHODS",
    "Batch",
    "NO_TOKEN",
    "MethodSetup",
    "Objective",
    "build_method",
    "causal_lm_objective",
    "classification_objective",
    "default_learning_rate",
    "head_predicate",
    "make_causal_lm_loss",
    "make_generate",
    "make_loss",
    "make_predict",
    "make_token_nll",
    "prompt_lengths",
    "store_frozen",
    "token_nll",
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
    frozen_dtype: Any = None,
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
      frozen_dtype: store the frozen base weights in this dtype (e.g. ``jnp.bfloat16``) to halve their
        memory; ``None`` keeps the model's.  Trainable leaves and frozen adapter leaves (VeRA's seeded
        projections) stay as they are (float32).

    Raises:
      ValueError: a name that is none of these, or an adapter method without its config.
    """
    if name in ADAPTER_METHODS:
        if config is None or config.method != name:
            raise ValueError(f"method {name!r} needs its adapter config, got {config!r}")
        adapted = cdvft_jax.inject(model, config)
        params = adapted.init(jax.random.key(seed), model.params)
        trainable, frozen = adapted.split(params)
        frozen = store_frozen(frozen, frozen_dtype, keep=adapted.is_adapter_leaf)
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
    frozen = store_frozen(frozen, frozen_dtype)
    count = cdvft_jax.count_params(trainable)
    total = count + cdvft_jax.count_params(frozen)
    return MethodSetup(model.__call__, trainable, frozen, optimizer, f"trainable params: {count:,} of {total:,}")


def store_frozen(frozen: Params, dtype: Any, keep: Callable[[str], bool] = lambda path: False) -> Params:
    """``frozen`` with every floating-point leaf but those ``keep`` names cast to ``dtype`` (``None``: as is).

    >>> tree = store_frozen({"a": jnp.ones(2), "b": jnp.ones(2), "i": jnp.arange(2)}, jnp.bfloat16, lambda p: p == "b")
    >>> {path: str(leaf.dtype) for path, leaf in flat_params(tree).items()}
    {'a': 'bfloat16', 'b': 'float32', 'i': 'int32'}
    """
    if dtype is None:
        return frozen
    return unflat_params(
        {
            path: leaf if keep(path) or not jnp.issubdtype(leaf.dtype, jnp.floating) else jnp.asarray(leaf, dtype)
            for path, leaf in flat_params(frozen).items()
        }
    )


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


# Causal language models.  A batch's ``labels`` are the token ids of ``input_ids`` where a token carries
# loss and ``IGNORE_INDEX`` where it does not (a prompt, padding): the Hugging Face convention.  The logits
# at position ``t`` predict the token at ``t + 1``.
IGNORE_INDEX = -100
NO_TOKEN = -1
"""What :func:`make_generate` writes after a row stopped (its eos, or the end of the batch's width)."""


def token_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position negative log-likelihood of ``labels[:, 1:]`` under ``logits[:, :-1]`` (in float32),
    and the float mask of the positions that carry loss (``labels != IGNORE_INDEX``); both ``(B, T - 1)``."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), jnp.where(mask, targets, 0)
    )
    return nll, mask.astype(jnp.float32)


def make_causal_lm_loss(
    apply: Callable[..., Any], *, dropout: bool = True
) -> Callable[[Params, Batch, jax.Array], jax.Array]:
    """``loss(params, batch, rng)``: the mean next-token cross-entropy over the tokens that carry loss
    (``batch.labels != IGNORE_INDEX``) in the rows of non-zero ``batch.weights``.  ``dropout`` as
    :func:`make_loss`."""

    def loss_fn(params: Params, batch: Batch, rng: jax.Array) -> jax.Array:
        if dropout:
            logits = apply(**batch.inputs, params=params, train=True, dropout_rng=rng).logits
        else:
            logits = apply(**batch.inputs, params=params, train=False).logits
        nll, mask = token_nll(logits, batch.labels)
        mask = mask * batch.weights[:, None]
        return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return loss_fn


def make_token_nll(apply: Callable[..., Any]) -> Callable[[Params, Batch], jax.Array]:
    """``predict(params, batch)``: each row's summed next-token loss over the tokens that carry loss,
    from which an evaluation computes the dev loss and perplexity."""

    def predict(params: Params, batch: Batch) -> jax.Array:
        nll, mask = token_nll(apply(**batch.inputs, params=params, train=False).logits, batch.labels)
        return jnp.sum(nll * mask, axis=1)

    return predict


def prompt_lengths(labels: jax.Array) -> jax.Array:
    """Each row's prompt length: the position of its first token that carries loss (at least 1)."""
    return jnp.maximum(jnp.argmax(labels != IGNORE_INDEX, axis=1), 1).astype(jnp.int32)


def make_generate(
    apply: Callable[..., Any],
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float | None = None,
    seed: int = 0,
) -> Callable[[Params, Batch], dict[str, jax.Array]]:
    """``generate(params, batch)``: continuations of each row's prompt (``input_ids`` before its first
    label, :func:`prompt_lengths`), ``{"greedy": (B, max_new_tokens)}`` token ids, plus ``"sampled"`` at
    ``temperature`` (keys from ``seed``) when it is given.

    Each new token is predicted by a full forward pass over the batch's width (no key-value cache: one
    compiled step for any model), at the row's own last position, so rows of any prompt length share the
    batch (right padding).  A row stops after ``eos_id`` (which is kept) or at the batch's width; later
    slots hold :data:`NO_TOKEN`.
    """

    def continuation(params: Params, ids: jax.Array, length: jax.Array, key: jax.Array | None) -> jax.Array:
        rows, width = ids.shape
        row = jnp.arange(rows)

        def step(t: int, carry: tuple) -> tuple:
            ids, length, done, out = carry
            mask = (jnp.arange(width)[None, :] < length[:, None]).astype(jnp.int32)
            logits = apply(input_ids=ids, attention_mask=mask, params=params, train=False).logits
            last = logits[row, length - 1].astype(jnp.float32)
            if key is None:
                token = jnp.argmax(last, axis=-1)
            else:
                token = jax.random.categorical(jax.random.fold_in(key, t), last / temperature)
            token = token.astype(jnp.int32)
            out = out.at[:, t].set(jnp.where(done, NO_TOKEN, token))
            grow = ~done & (length < width)
            at = jnp.minimum(length, width - 1)
            ids = ids.at[row, at].set(jnp.where(grow, token, ids[row, at]))
            done = done | ~grow | (token == eos_id)
            return ids, length + grow, done, out

        start = (ids, length, jnp.zeros(rows, bool), jnp.full((rows, max_new_tokens), NO_TOKEN, jnp.int32))
        return jax.lax.fori_loop(0, max_new_tokens, step, start)[3]

    def generate(params: Params, batch: Batch) -> dict[str, jax.Array]:
        ids, length = jnp.asarray(batch.inputs["input_ids"]), prompt_lengths(batch.labels)
        out = {"greedy": continuation(params, ids, length, None)}
        if temperature is not None:
            out["sampled"] = continuation(params, ids, length, jax.random.key(seed))
        return out

    return generate


class Objective(NamedTuple):
    """What a run minimises and what its evaluation reads, each built from the model's ``apply``.

    Attributes:
      loss: ``loss(apply) -> loss(params, batch, rng)``.
      predict: ``predict(apply) -> predict(params, batch)``: an array, or a dict of arrays, with the batch
        on the leading axis (what the dev metrics are computed from).
      generate: ``generate(apply) -> generate(params, batch)`` of the same kind, for evaluations that
        generate (``None``: the objective does not).
    """

    loss: Callable[[Callable[..., Any]], Callable[[Params, Batch, jax.Array], jax.Array]]
    predict: Callable[[Callable[..., Any]], Callable[[Params, Batch], Any]]
    generate: Callable[[Callable[..., Any]], Callable[[Params, Batch], Any]] | None = None


def classification_objective(regression: bool = False) -> Objective:
    """Cross-entropy on class ids and argmax predictions (squared error and scores for ``regression``)."""
    return Objective(
        functools.partial(make_loss, regression=regression), functools.partial(make_predict, regression=regression)
    )


def causal_lm_objective(
    *, max_new_tokens: int | None = None, eos_id: int | None = None, temperature: float | None = None, seed: int = 0
) -> Objective:
    """Masked next-token cross-entropy (:func:`make_causal_lm_loss`), per-row token losses for the dev loss
    and perplexity (:func:`make_token_nll`) and, with ``max_new_tokens``, generation (:func:`make_generate`).

    Raises:
      ValueError: ``max_new_tokens`` without ``eos_id``.
    """
    generate = None
    if max_new_tokens is not None:
        if eos_id is None:
            raise ValueError("generation needs the eos token id")
        generate = functools.partial(
            make_generate, max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature, seed=seed
        )
    return Objective(make_causal_lm_loss, make_token_nll, generate)
