"""Trainable-only training: optimizers and a jitted train step over split trees.

The fast path keeps two trees: ``trainable`` (adapter leaves and
``modules_to_save``) and ``frozen`` (everything else).  :func:`make_train_step`
differentiates with respect to ``trainable`` only and receives ``frozen`` as a
``jit`` argument (never a closure constant), so XLA never computes a gradient
for a frozen weight and never bakes the base model into the executable.

Two traps make XLA compute every frozen weight gradient, which makes a step
as slow as full fine-tuning (measured on this project's CPU):

* one params tree whose optimizer clips by global norm over *all* leaves
  (``optax.clip_by_global_norm`` outside the partition): the norm reads every
  frozen gradient, so none can be pruned.  :func:`single_tree_optimizer`
  clips inside the trainable branch only.
* computing gradients in one jitted function and applying them in another:
  the first must return every gradient, frozen ones included.  Take the
  gradient and apply the update in the same ``jit``, as
  :func:`make_train_step` does.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cdvft_jax.injection import AdaptedModel
from cdvft_jax.params import Params, merge_params

__all__ = [
    "WARMUP_RATIO",
    "TrainState",
    "adapter_optimizer",
    "init_train_state",
    "make_eval_step",
    "make_train_step",
    "single_tree_optimizer",
    "warmup_linear_decay",
]

ScalarOrSchedule = float | optax.Schedule

WARMUP_RATIO = 0.06
"""The share of the steps :func:`warmup_linear_decay` warms up over by default: the schedule every number of
the accuracy suite (``benchmarks/NOTES.md``) was measured with, as in the RoBERTa and LoRA papers."""


def warmup_linear_decay(peak: float, total_steps: int, warmup_ratio: float = WARMUP_RATIO) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_ratio`` of the steps (rounded, at least one: the first
    update's rate is always 0), then linear decay to zero at ``total_steps``: the recipe's schedule, for
    :func:`adapter_optimizer` ``(total_steps=...)``.

    >>> rates = warmup_linear_decay(1.0, total_steps=10, warmup_ratio=0.2)
    >>> [round(float(rates(step)), 3) for step in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]

    Raises:
      ValueError: ``total_steps`` is not a positive integer or ``warmup_ratio`` is outside ``[0, 1)``.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if isinstance(warmup_ratio, bool) or not isinstance(warmup_ratio, int | float) or not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be a number in [0, 1), got {warmup_ratio!r}")
    warmup = max(1, round(warmup_ratio * total_steps))
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, warmup),
            optax.linear_schedule(peak, 0.0, max(1, total_steps - warmup)),
        ],
        [warmup],
    )


def _labels(label_of: Callable[[str], str]) -> Callable[[Params], Any]:
    def labels(tree: Params) -> Any:
        return jax.tree_util.tree_map_with_path(lambda path, _: label_of("/".join(str(k.key) for k in path)), tree)

    return labels


def _adamw(learning_rate: ScalarOrSchedule, weight_decay: float, b1: float, b2: float, eps: float):
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def adapter_optimizer(
    adapted: AdaptedModel,
    *,
    adapter_learning_rate: ScalarOrSchedule | None = None,
    head_learning_rate: ScalarOrSchedule | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    total_steps: int | None = None,
    warmup_ratio: float = WARMUP_RATIO,
) -> optax.GradientTransformation:
    """AdamW over the *trainable* tree with separate rates for adapter and head.

    The paper's protocol: adapter vectors and the ``modules_to_save`` (task
    head) each get their own learning rate (or schedule).  Apply it to the
    ``trainable`` tree of :meth:`AdaptedModel.split`.  With ``total_steps``,
    both rates are peaks of :func:`warmup_linear_decay`, the recipe every
    accuracy number of the project was measured with; without it they are
    constant (or the schedules you pass).

    Args:
      adapted: the adapted model (tells adapter leaves from head leaves).
      adapter_learning_rate: rate or schedule of the adapter leaves; ``None`` is the
        method's :attr:`~cdvft_jax.AdapterMethod.learning_rate` (constant).
      head_learning_rate: rate or schedule of ``modules_to_save``; defaults to
        ``adapter_learning_rate``.
      weight_decay: AdamW decoupled weight decay, for both groups.
      max_grad_norm: clip the trainable gradients to this global norm.
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's epsilon.
      total_steps: the run's length: warm up over ``warmup_ratio`` of it, then
        decay linearly to zero at its end (``None``: no schedule).
      warmup_ratio: with ``total_steps``, the share of the steps that warm up.

    Raises:
      ValueError: ``total_steps`` together with a schedule as a rate (it
        schedules numbers), or a bad ``total_steps`` / ``warmup_ratio``.

    Example:
      With ``adapted`` from :func:`~cdvft_jax.inject` and ``trainable`` from its ``split``, the
      recipe of the project's programs for a run of 1,000 steps::

        tx = adapter_optimizer(adapted, total_steps=1000)  # 5e-3 for CDVFT and head, 6% warm-up
        state = init_train_state(trainable, tx)
    """
    if adapter_learning_rate is None:
        adapter_learning_rate = adapted.method.learning_rate
    head_lr = adapter_learning_rate if head_learning_rate is None else head_learning_rate
    if total_steps is not None:
        if callable(adapter_learning_rate) or callable(head_lr):
            raise ValueError("total_steps schedules peak rates: give numbers as the rates, not schedules")
        adapter_learning_rate = warmup_linear_decay(adapter_learning_rate, total_steps, warmup_ratio)
        head_lr = warmup_linear_decay(head_lr, total_steps, warmup_ratio)
    groups = optax.partition(
        {
            "adapter": _adamw(adapter_learning_rate, weight_decay, b1, b2, eps),
            "head": _adamw(head_lr, weight_decay, b1, b2, eps),
        },
        _labels(lambda path: "adapter" if adapted.is_adapter_leaf(path) else "head"),
    )
    if max_grad_norm is None:
        return groups
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), groups)


def single_tree_optimizer(
    adapted: AdaptedModel,
    *,
    adapter_learning_rate: ScalarOrSchedule | None = None,
    head_learning_rate: ScalarOrSchedule | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    total_steps: int | None = None,
    warmup_ratio: float = WARMUP_RATIO,
) -> optax.GradientTransformation:
    """The optimizer of :func:`adapter_optimizer` for users who keep one params tree.

    Frozen leaves get ``optax.set_to_zero()`` and no optimizer state; gradient
    clipping sees the trainable leaves only, so inside one ``jit`` XLA can
    prune every frozen weight gradient.  Still prefer split trees: they never
    ask for those gradients in the first place.
    """
    trainable = adapter_optimizer(
        adapted,
        adapter_learning_rate=adapter_learning_rate,
        head_learning_rate=head_learning_rate,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        b1=b1,
        b2=b2,
        eps=eps,
        total_steps=total_steps,
        warmup_ratio=warmup_ratio,
    )
    return optax.partition(
        {"trainable": trainable, "frozen": optax.set_to_zero()},
        _labels(lambda path: "trainable" if adapted.is_trainable(path) else "frozen"),
    )


class TrainState(NamedTuple):
    """What a train step updates: the step count, trainable params, optimizer state."""

    step: jax.Array
    trainable: Params
    opt_state: optax.OptState


def init_train_state(trainable: Params, optimizer: optax.GradientTransformation) -> TrainState:
    """A :class:`TrainState` at step 0 holding a *copy* of ``trainable``.

    The train step donates its state, and split trees share their arrays
    with the tree they came from (e.g. a Hugging Face model's ``params``);
    copying keeps the first step from deleting the caller's arrays.
    """
    trainable = jax.tree.map(jax.numpy.copy, trainable)
    return TrainState(jax.numpy.zeros((), jax.numpy.int32), trainable, optimizer.init(trainable))


LossFn = Callable[[Params, Any, jax.Array], jax.Array]
"""``loss_fn(params, batch, rng) -> scalar``, with ``params`` the full (merged) tree."""


def make_train_step(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, *, donate: bool = True
) -> Callable[[TrainState, Params, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted ``train_step(state, frozen, batch, rng) -> (state, metrics)``.

    The gradient is taken with respect to ``state.trainable`` only and the
    update is applied in the same ``jit``; ``frozen`` is an argument, so the
    same executable serves any frozen weights of the same shapes.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> scalar`` on the full params tree.
      optimizer: e.g. :func:`adapter_optimizer`.
      donate: donate the old state's buffers to the new one.

    Returns:
      The jitted step; ``metrics`` holds ``loss`` and ``finite`` (a boolean scalar: the loss, every
      updated trainable weight and the optimizer state are finite).
    """

    def train_step(state: TrainState, frozen: Params, batch: Any, rng: jax.Array):
        def objective(trainable: Params) -> jax.Array:
            return loss_fn(merge_params(trainable, frozen), batch, rng)

        loss, grads = jax.value_and_grad(objective)(state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        # No gradient norm is reported: over a single params tree it would read
        # every frozen gradient and keep XLA from pruning them.  A non-finite
        # gradient shows in the updated weights and optimizer state (Adam's
        # second moment can overflow while the weights stay finite), so those
        # are checked instead.
        finite = jnp.isfinite(loss) & _all_finite(trainable) & _all_finite(opt_state)
        return TrainState(state.step + 1, trainable, opt_state), {"loss": loss, "finite": finite}

    return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def _all_finite(tree: Params) -> jax.Array:
    leaves = [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def make_eval_step(fn: Callable[[Params, Any], Any]) -> Callable[[Params, Params, Any], Any]:
    """A jitted ``eval_step(trainable, frozen, batch) = fn(merge_params(trainable, frozen), batch)``."""

    def eval_step(trainable: Params, frozen: Params, batch: Any) -> Any:
        return fn(merge_params(trainable, frozen), batch)

    return jax.jit(eval_step)
