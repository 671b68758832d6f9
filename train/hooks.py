"""What the training loop does besides stepping, as hooks: checkpoints, the metrics log, progress, TensorBoard.

``train.loop.train_and_evaluate`` calls every :class:`Hook` in order: :meth:`Hook.on_evaluation` for each
dev evaluation (the one before training included), :meth:`Hook.on_start` when the first step is about to
run, :meth:`Hook.on_step` after each optimizer step, then :meth:`Hook.on_finish` after the last step or
:meth:`Hook.on_abort` when an error stops the run.  A program adds its own hooks with the loop's
``extra_hooks`` argument (as levanter's ``Trainer.add_hook``).

A hook must not make the host wait for the device on every step: a step's loss is read only through
``event.losses`` (:class:`~train.loop.RunningLoss`), at the sync points the built-in hooks share (every
:data:`SYNC_EVERY` steps and the last).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
from tqdm import tqdm

from cdvft_jax import sharding
from cdvft_jax.checkpoint import CheckpointWriteError, TrainingCheckpointer

if TYPE_CHECKING:
    from train.loop import RunningLoss

__all__ = [
    "SYNC_EVERY",
    "CheckpointHook",
    "Hook",
    "MetricsLogHook",
    "ProgressHook",
    "StepEvent",
    "TensorBoardHook",
    "append_jsonl",
    "tensorboard_available",
]

SYNC_EVERY = 10
"""Steps between the reads of the running loss (the progress bar's and TensorBoard's)."""


class StepEvent(NamedTuple):
    """Where a run stands after an optimizer step.

    Attributes:
      step: the optimizer steps done.
      total_steps: the run's budget.
      state: the train state after the step.
      dropout_key: the run's key (saved with a checkpoint).
      losses: the epoch's running loss (read it only at sync points).
      position: the resumable data position after the step: a callable (it reads the loss) or a dict.
      examples: rows in the step's batch.
    """

    step: int
    total_steps: int
    state: Any
    dropout_key: jax.Array
    losses: RunningLoss
    position: Callable[[], dict[str, Any]] | dict[str, Any]
    examples: int

    @property
    def synced(self) -> bool:
        """Whether this is a step at which hooks may read the loss."""
        return self.step % SYNC_EVERY == 0 or self.step == self.total_steps


class Hook:
    """A training-loop hook; every method does nothing unless overridden."""

    def on_evaluation(self, record: dict[str, Any]) -> None:
        """A dev evaluation, as logged: ``method``, ``step``, ``epoch``, ``train_loss`` and the metrics."""

    def on_start(self, step: int) -> None:
        """Training is about to run from ``step`` (0, or the step a resumed run restored)."""

    def on_step(self, event: StepEvent) -> None:
        """An optimizer step is done."""

    def on_finish(self, event: StepEvent) -> None:
        """The run reached its last step (``event`` describes it)."""

    def on_abort(self) -> None:
        """An error stops the run; release resources without hiding that error."""


class CheckpointHook(Hook):
    """Saves the train state every ``checkpointer.save_every`` steps and after the last one."""

    def __init__(self, checkpointer: TrainingCheckpointer) -> None:
        self.checkpointer = checkpointer
        self._closed = False

    def on_step(self, event: StepEvent) -> None:
        self.checkpointer.maybe_save(event.step, event.state, event.dropout_key, event.position)

    def on_finish(self, event: StepEvent) -> None:
        self.checkpointer.maybe_save(event.step, event.state, event.dropout_key, event.position, force=True)
        self._closed = True
        self.checkpointer.close()  # waits for pending asynchronous saves

    def on_abort(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(CheckpointWriteError):  # the error in flight says more than a failed save
                self.checkpointer.close()


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Appends ``record`` as one line of ``path``, flushed to disk (process 0 only: one writer per run)."""
    if not sharding.is_main_process():
        return
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


class MetricsLogHook(Hook):
    """Appends every evaluation to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_evaluation(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)


class ProgressHook(Hook):
    """A tqdm bar of the steps, with the running loss and examples per second, and a line per epoch."""

    def __init__(self, description: str, method: str, total_steps: int) -> None:
        self.description, self.method, self.total_steps = description, method, total_steps
        self._bar: tqdm | None = None
        self._first_step, self._start = 0, 0.0

    def on_start(self, step: int) -> None:
        self._bar = tqdm(total=self.total_steps, initial=step, desc=self.description, unit="step", dynamic_ncols=True)
        self._first_step, self._start = step, time.perf_counter()

    def on_step(self, event: StepEvent) -> None:
        if event.synced:
            rate = (event.step - self._first_step) * event.examples / (time.perf_counter() - self._start)
            self._bar.set_postfix(loss=f"{event.losses.mean():.4f}", ex_per_s=f"{rate:.0f}")
        self._bar.update(1)

    def on_evaluation(self, record: dict[str, Any]) -> None:
        if self._bar is not None and record["epoch"] > 0:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in _RECORD_FIELDS)
            self._bar.write(
                f"[{self.method}] epoch {record['epoch']}: train loss {record['train_loss']:.4f}, dev {metrics}"
            )

    def on_finish(self, event: StepEvent) -> None:
        self.on_abort()

    def on_abort(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


_RECORD_FIELDS = ("method", "step", "epoch", "train_loss")


def tensorboard_available() -> bool:
    """Whether ``tensorboardX`` (TensorBoard's event writer without TensorFlow) is installed."""
    return importlib.util.find_spec("tensorboardX") is not None


class TensorBoardHook(Hook):
    """TensorBoard event files in ``logdir``: the epoch's running train loss at each sync point
    (``train/loss``), and every evaluation's dev metrics (``dev/<metric>``) and epoch loss
    (``train/epoch_loss``).  Needs ``tensorboardX``; only process 0 writes.

    A resumed run passes the step it restored as ``resumed_from``: what the cut-short run logged after that
    step is hidden (TensorBoard's ``purge_step``, here ``resumed_from + 1``) and logged again by the resumed
    run; what it logged up to that step (an evaluation at a checkpointed epoch end) stays, as the resumed
    run does not redo it.
    """

    def __init__(self, logdir: Path, metric_names: Sequence[str], resumed_from: int | None = None) -> None:
        from tensorboardX import SummaryWriter

        self.metric_names = tuple(metric_names)
        self._writer = None
        if sharding.is_main_process():
            purge = None if resumed_from is None else resumed_from + 1
            # The suffix keeps a resumed run's file apart from the one it resumes (names end in seconds).
            suffix = f".from{0 if resumed_from is None else resumed_from}"
            self._writer = SummaryWriter(str(logdir), purge_step=purge, filename_suffix=suffix)

    def on_step(self, event: StepEvent) -> None:
        if self._writer is not None and event.synced:
            self._writer.add_scalar("train/loss", event.losses.mean(), event.step)

    def on_evaluation(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        for name in self.metric_names:
            if record.get(name) is not None:
                self._writer.add_scalar(f"dev/{name}", record[name], record["step"])
        if record["train_loss"] is not None:
            self._writer.add_scalar("train/epoch_loss", record["train_loss"], record["step"])
        self._writer.flush()

    def on_finish(self, event: StepEvent) -> None:
        self.on_abort()

    def on_abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
