"""A tiny checkpointed CDVFT training run, shared by ``test_checkpoint.py`` and run by it as a process to kill.

Usage::

    python tests/checkpoint_worker.py DIRECTORY --steps N [--resume] [--sleep SECONDS] [--out FILE.npz]

trains the tiny RoBERTa of ``conftest`` for ``N`` steps, checkpointing into
``DIRECTORY`` every :data:`SAVE_EVERY` steps, force-saves the last step and
writes the final train state with ``np.savez``.  With ``--resume`` it first
restores the latest checkpoint.  It prints one JSON line,
``{"resumed_step": ..., "resumed_position": ...}``, or, when the checkpoint
cannot be restored, ``{"error": TYPE, "message": ...}`` and exits with 1.
The error goes to stdout because orbax's abandoned reads print tracebacks to
stderr from other threads, interleaved with anything written there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from conftest import make_inputs, make_model

import cdvft_jax
from cdvft_jax import CDVFTConfig
from cdvft_jax.checkpoint import CorruptCheckpointError, TrainingCheckpointer
from cdvft_jax.params import flat_params

SAVE_EVERY = 2
BATCHES_PER_EPOCH = 3
RUN_SEED = 1234
START_POSITION = {"epoch": 0, "batch": 0}


class Run(NamedTuple):
    """Everything a run needs besides its train state: built once, reused by every run of a test module."""

    init_state: Callable[[], cdvft_jax.TrainState]
    frozen: Any
    train_step: Callable


def make_run() -> Run:
    """The tiny RoBERTa with CDVFT and a trainable head; dropout is on, so the RNG key matters."""
    model = make_model("roberta")
    adapted = cdvft_jax.inject(model, CDVFTConfig(modules_to_save=["classifier"]))
    trainable, frozen = adapted.split(adapted.init(jax.random.key(0), model.params))
    optimizer = cdvft_jax.adapter_optimizer(adapted, adapter_learning_rate=1e-2, head_learning_rate=1e-3)

    def loss_fn(params, batch, rng):
        inputs, labels = batch
        logits = adapted(**inputs, params=params, train=True, dropout_rng=rng).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return Run(
        init_state=lambda: cdvft_jax.init_train_state(trainable, optimizer),
        frozen=frozen,
        train_step=cdvft_jax.make_train_step(loss_fn, optimizer),
    )


def next_position(position: dict[str, int]) -> dict[str, int]:
    """The data position after reading the batch at ``position``."""
    batch = position["batch"] + 1
    if batch == BATCHES_PER_EPOCH:
        return {"epoch": position["epoch"] + 1, "batch": 0}
    return {"epoch": position["epoch"], "batch": batch}


def train(
    run: Run,
    steps: int,
    checkpointer: TrainingCheckpointer | None = None,
    *,
    resume: bool = False,
    save_last: bool = True,
    sleep: float = 0.0,
) -> tuple[cdvft_jax.TrainState, int | None, dict[str, int] | None]:
    """Trains up to ``steps`` steps: ``(state, resumed step, resumed data position)``.

    Batches are read from the data position, not the step, so resuming with
    a wrong position (or a wrong RNG key, for dropout) changes the result.
    ``save_last=False`` stops like an interrupted run, without the final save.
    """
    state, rng, position = run.init_state(), jax.random.key(RUN_SEED), dict(START_POSITION)
    resumed_step = resumed_position = None
    if resume:
        # A different key: the restored one must replace it.
        restored = checkpointer.restore_latest(run.init_state(), jax.random.key(0))
        if restored is not None:
            state, rng, position = restored
            resumed_step, resumed_position = int(state.step), dict(position)
    for step in range(int(state.step) + 1, steps + 1):
        batch = make_inputs("roberta", seed=position["batch"])
        state, _ = run.train_step(state, run.frozen, batch, jax.random.fold_in(rng, step))
        position = next_position(position)
        if checkpointer is not None:
            checkpointer.maybe_save(step, state, rng, position)
        time.sleep(sleep)
    if checkpointer is not None and save_last:
        checkpointer.maybe_save(steps, state, rng, position, force=True)
    return state, resumed_step, resumed_position


def state_arrays(state: cdvft_jax.TrainState) -> dict[str, np.ndarray]:
    """The trainable params and optimizer state as ``{name: host array}``."""
    arrays = {f"trainable/{k}": np.asarray(v) for k, v in flat_params(state.trainable).items()}
    arrays.update({f"opt_state/{i}": np.asarray(v) for i, v in enumerate(jax.tree.leaves(state.opt_state))})
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each step")
    parser.add_argument("--out", help="where to write the final state (.npz)")
    args = parser.parse_args()
    try:
        with TrainingCheckpointer(args.directory, save_every=SAVE_EVERY) as checkpointer:
            state, resumed_step, resumed_position = train(
                make_run(), args.steps, checkpointer, resume=args.resume, sleep=args.sleep
            )
    except CorruptCheckpointError as error:
        print(json.dumps({"error": type(error).__name__, "message": str(error)}), flush=True)
        sys.exit(1)
    if args.out:
        np.savez(args.out, **state_arrays(state))
    print(json.dumps({"resumed_step": resumed_step, "resumed_position": resumed_position}), flush=True)


if __name__ == "__main__":
    main()
