"""Where a run computes: one device, or a mesh of devices over one or more processes.

:func:`make_runtime` places a method's state and frozen tree and builds its train and eval steps (and the
generation step of an objective that generates), so the loop (``train.loop``) uses the same things whatever
the hardware: ``train_step``, ``eval_step`` and ``generate_step`` on host batches, the placed ``state`` and
``frozen`` trees, and the ``dropout_key``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import cdvft_jax
from cdvft_jax import sharding
from cdvft_jax.params import Params
from train.methods import Batch, MethodSetup, Objective

__all__ = ["Runtime", "make_runtime"]


class Runtime(NamedTuple):
    """A run placed on its devices.

    Attributes:
      state: the train state (replicated on a mesh).
      frozen: the frozen tree (FSDP-sharded on a mesh).
      train_step: ``(state, frozen, host batch, rng) -> (state, metrics)``; it places the batch itself.
      eval_step: ``(trainable, frozen, host batch) -> predictions``, host-readable (an array or a dict of
        arrays, as the objective's ``predict`` returns).
      dropout_key: the run's dropout key (replicated on a mesh); step ``k`` uses ``fold_in(key, k)``.
      generate_step: as ``eval_step``, for the objective's ``generate`` (``None`` when it has none).
    """

    state: cdvft_jax.TrainState
    frozen: Params
    train_step: Callable[[cdvft_jax.TrainState, Params, Batch, jax.Array], tuple[cdvft_jax.TrainState, dict]]
    eval_step: Callable[[Params, Params, Batch], Any]
    dropout_key: jax.Array
    generate_step: Callable[[Params, Params, Batch], Any] | None = None


def make_runtime(setup: MethodSetup, *, objective: Objective, seed: int, mesh: Mesh | None) -> Runtime:
    """The :class:`Runtime` of ``setup`` under ``objective`` on one device (``mesh=None``) or on ``mesh``.

    On a mesh the frozen base is FSDP-sharded along ``fsdp``, the batch split over ``data`` x ``fsdp`` and
    the trainable state replicated (:func:`cdvft_jax.sharding.shard_training`).  With several processes
    every process iterates the same global batches and places only its own rows
    (``sharding.local_rows``); predictions come back replicated, so every process computes the same metrics.
    """
    state = cdvft_jax.init_train_state(setup.trainable, setup.optimizer)
    loss_fn = objective.loss(setup.apply)
    eval_step = cdvft_jax.make_eval_step(objective.predict(setup.apply))
    generate_step = None
    if objective.generate is not None:
        generate_step = cdvft_jax.make_eval_step(objective.generate(setup.apply))
    dropout_key = jax.random.key(seed)
    if mesh is None:
        train_step = cdvft_jax.make_train_step(loss_fn, setup.optimizer)
        return Runtime(state, setup.frozen, train_step, eval_step, dropout_key, generate_step)

    state, frozen, sharded_step = sharding.shard_training(loss_fn, setup.optimizer, state, setup.frozen, mesh)

    def place(batch: Batch) -> Batch:
        # Every process holds the same global batch and places only its own rows.
        return sharding.global_batch_from_local(sharding.local_rows(batch, mesh), mesh)

    replicated = NamedSharding(mesh, PartitionSpec())

    def on_mesh(step: Callable[[Params, Params, Batch], Any]) -> Callable[[Params, Params, Batch], Any]:
        # Replicated predictions can be read on every process (a batch-sharded output spans all hosts).
        sharded = jax.jit(step, out_shardings=replicated)
        return lambda trainable, frozen, batch: sharded(trainable, frozen, place(batch))

    # device_put takes a cross-process sharding for host arrays, not for typed keys.
    key_data = jax.device_put(np.asarray(jax.random.key_data(dropout_key)), replicated)
    return Runtime(
        state,
        frozen,
        lambda state, frozen, batch, rng: sharded_step(state, frozen, place(batch), rng),
        on_mesh(eval_step),
        jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(dropout_key)),
        None if generate_step is None else on_mesh(generate_step),
    )
