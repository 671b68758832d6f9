"""Where a run computes: one device, or a mesh of devices over one or more processes.

:func:`make_runtime` places a method's state and frozen tree and builds its train and eval steps, so the
loop (``train.loop``) uses the same things whatever the hardware: ``train_step`` and ``eval_step`` on host
batches, the placed ``state`` and ``frozen`` trees, and the ``dropout_key``.
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
from train.methods import Batch, MethodSetup, make_loss, make_predict

__all__ = ["Runtime", "make_runtime"]


class Runtime(NamedTuple):
    """A run placed on its devices.

    Attributes:
      state: the train state (replicated on a mesh).
      frozen: the frozen tree (FSDP-sharded on a mesh).
      train_step: ``(state, frozen, host batch, rng) -> (state, metrics)``; it places the batch itself.
      eval_step: ``(trainable, frozen, host batch) -> predictions`` as a host-readable array.
      dropout_key: the run's dropout key (replicated on a mesh); step ``k`` uses ``fold_in(key, k)``.
    """

    state: cdvft_jax.TrainState
    frozen: Params
    train_step: Callable[[cdvft_jax.TrainState, Params, Batch, jax.Array], tuple[cdvft_jax.TrainState, dict]]
    eval_step: Callable[[Params, Params, Batch], Any]
    dropout_key: jax.Array


def make_runtime(setup: MethodSetup, *, regression: bool, seed: int, mesh: Mesh | None) -> Runtime:
    """The :class:`Runtime` of ``setup`` on one device (``mesh=None``) or on ``mesh``.

    On a mesh the frozen base is FSDP-sharded along ``fsdp``, the batch split over ``data`` x ``fsdp`` and
    the trainable state replicated (:func:`cdvft_jax.sharding.shard_training`).  With several processes
    every process iterates the same global batches and places only its own rows
    (``sharding.local_rows``); predictions come back replicated, so every process computes the same metrics.
    """
    state = cdvft_jax.init_train_state(setup.trainable, setup.optimizer)
    loss_fn = make_loss(setup.apply, regression=regression)
    eval_step = cdvft_jax.make_eval_step(make_predict(setup.apply, regression=regression))
    dropout_key = jax.random.key(seed)
    if mesh is None:
        return Runtime(state, setup.frozen, cdvft_jax.make_train_step(loss_fn, setup.optimizer), eval_step, dropout_key)

    state, frozen, sharded_step = sharding.shard_training(loss_fn, setup.optimizer, state, setup.frozen, mesh)

    def place(batch: Batch) -> Batch:
        # Every process holds the same global batch and places only its own rows.
        return sharding.global_batch_from_local(sharding.local_rows(batch, mesh), mesh)

    replicated = NamedSharding(mesh, PartitionSpec())
    # Replicated predictions can be read on every process (a batch-sharded output spans all hosts).
    sharded_eval_step = jax.jit(eval_step, out_shardings=replicated)
    # device_put takes a cross-process sharding for host arrays, not for typed keys.
    key_data = jax.device_put(np.asarray(jax.random.key_data(dropout_key)), replicated)
    return Runtime(
        state,
        frozen,
        lambda state, frozen, batch, rng: sharded_step(state, frozen, place(batch), rng),
        lambda trainable, frozen, batch: sharded_eval_step(trainable, frozen, place(batch)),
        jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(dropout_key)),
    )
