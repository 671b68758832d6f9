"""Resumable training checkpoints of the trainable state only, with Orbax.

A CDVFT run trains a few adapter vectors and a task head on top of a frozen
base model, so a checkpoint needs only the :class:`~cdvft_jax.TrainState`
(step, trainable params, optimizer state), the RNG key and the position in
the data.  The frozen base is never written: resuming rebuilds it from the
pretrained weights, exactly as the run started.

Each checkpoint is a step directory written by ``orbax.checkpoint``:

* Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to
  ``<step>`` only once every item is on disk.  A process that dies mid-save
  leaves only the temporary directory, which is never listed as a step (the
  next :class:`TrainingCheckpointer` to open the directory deletes it), so
  :meth:`TrainingCheckpointer.restore_latest` only ever sees finalized steps.
* Orbax stores arrays without checksums: a flipped byte in a finalized step
  restores silently wrong values.  Each step therefore also records a CRC32 of
  every array, checked on restore; a step with missing or damaged files raises
  :class:`CorruptCheckpointError` instead of resuming from garbage.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from cdvft_jax.training import TrainState

__all__ = ["CheckpointWriteError", "CorruptCheckpointError", "TrainingCheckpointer"]

# A checksum record maps a leaf's key path to {"crc32", "dtype", "shape"}.
_Record = dict[str, dict[str, Any]]


class CorruptCheckpointError(RuntimeError):
    """A finalized checkpoint step is incomplete or its arrays do not match their checksums."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, say); the steps finalized before it stay loadable."""


def _is_typed_key(rng: jax.Array) -> bool:
    return jax.numpy.issubdtype(rng.dtype, jax.dtypes.prng_key)


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:  # deleted between listing and stat
        return None


def _rng_tree(rng: jax.Array) -> dict[str, jax.Array]:
    # StandardSave refuses a bare array, and typed keys are not serializable:
    # store the raw key data in a one-leaf tree.
    return {"key_data": jax.random.key_data(rng) if _is_typed_key(rng) else rng}


def _checksums(tree: Any) -> _Record:
    record = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        host = np.asarray(jax.device_get(leaf))
        record[jax.tree_util.keystr(path)] = {
            "crc32": zlib.crc32(host.tobytes()),
            "dtype": str(host.dtype),
            "shape": list(host.shape),
        }
    return record


def _check_template(record: _Record, template: Any, where: str) -> None:
    """Raises ``ValueError`` unless ``template`` has the saved paths, shapes and dtypes."""
    leaves = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(template)[0]}
    missing, unexpected = sorted(record.keys() - leaves.keys()), sorted(leaves.keys() - record.keys())
    if missing or unexpected:
        raise ValueError(
            f"the restore template does not fit the checkpoint at {where}: leaves only in the checkpoint "
            f"{missing[:4]}, leaves only in the template {unexpected[:4]} (was the optimizer or config changed?)"
        )
    for path, leaf in leaves.items():
        saved = (tuple(record[path]["shape"]), record[path]["dtype"])
        if (tuple(leaf.shape), str(leaf.dtype)) != saved:
            raise ValueError(
                f"the restore template does not fit the checkpoint at {where}: {path} was saved with "
                f"shape and dtype {saved}, the template has {(tuple(leaf.shape), str(leaf.dtype))}"
            )


class TrainingCheckpointer:
    """Saves and resumes a training run's trainable state with an Orbax ``CheckpointManager``.

    A step holds the :class:`~cdvft_jax.TrainState` (never the frozen base),
    the RNG key and a small JSON data position such as
    ``{"epoch": 2, "batch": 17}``, plus checksums of the arrays.  Saves are
    asynchronous by default: :meth:`maybe_save` returns once the arrays are
    copied to host memory (so the train step may donate them right away) and
    the files are written in the background.  Use the checkpointer as a
    context manager, or call :meth:`close`, so pending saves finish before the
    process exits.

    One process writes a directory: opening a checkpointer deletes unfinished
    temporary step directories left by a process that died mid-save.

    Attributes:
      directory: the checkpoint directory; step ``n`` lives in ``directory/n``.

    Example:
      A training loop that resumes where a killed run left off::

        state = init_train_state(trainable, optimizer)
        rng = jax.random.key(seed)
        position = {"epoch": 0, "batch": 0}
        with TrainingCheckpointer(workdir, save_every=500) as checkpointer:
            restored = checkpointer.restore_latest(state, rng)
            if restored is not None:
                state, rng, position = restored
            for step in range(int(state.step) + 1, num_steps + 1):
                batch, position = next_batch(position)
                state, metrics = train_step(state, frozen, batch, jax.random.fold_in(rng, step))
                checkpointer.maybe_save(step, state, rng, position)
            checkpointer.maybe_save(num_steps, state, rng, position, force=True)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: int,
        max_to_keep: int = 3,
        async_save: bool = True,
    ) -> None:
        """Opens (creating if needed) the checkpoint directory.

        Args:
          directory: where the step directories live.
          save_every: :meth:`maybe_save` saves at steps that are multiples of it.
          max_to_keep: how many of the newest checkpoints to keep; older ones
            are deleted after each save.
          async_save: write files in a background thread.

        Raises:
          ValueError: if ``save_every`` or ``max_to_keep`` is not positive.
        """
        if save_every < 1:
            raise ValueError(f"save_every must be a positive number of steps, got {save_every}")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be positive, got {max_to_keep}")
        self.directory = os.fspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                # The policies replace the deprecated save_interval_steps and
                # max_to_keep options (whose defaults also save the first step).
                save_decision_policy=checkpoint_managers.FixedIntervalPolicy(save_every),
                preservation_policy=checkpoint_managers.LatestN(max_to_keep),
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
        )

    def maybe_save(
        self,
        step: int,
        state: TrainState,
        rng: jax.Array,
        data_position: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
        force: bool = False,
    ) -> bool:
        """Saves a checkpoint at multiples of ``save_every``, or whenever ``force`` is set.

        Args:
          step: the number of train steps taken; names the checkpoint.
          state: the train state after ``step`` steps.
          rng: the run's base key (typed or raw), from which per-step keys are derived.
          data_position: where to resume the data, e.g. ``{"epoch": 2, "batch": 17}``;
            any JSON-serializable mapping (Python floats round-trip exactly), or a
            function returning one, called only when a checkpoint is written (so
            a position that reads device values costs no host sync between saves).
          force: save even off the interval, e.g. after the last step.  A step
            that is already saved is not written again.

        Returns:
          Whether a checkpoint was started.
        """
        if step in self._manager.all_steps() or not (force or self._manager.should_save(step)):
            return False
        if callable(data_position):
            data_position = data_position()
        rng_tree = _rng_tree(rng)
        with self._naming_write_errors():
            return self._save(step, state, rng_tree, data_position)

    def _save(self, step: int, state: TrainState, rng_tree: Any, data_position: Mapping[str, Any]) -> bool:
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                rng=ocp.args.StandardSave(rng_tree),
                data=ocp.args.JsonSave(dict(data_position)),
                checksums=ocp.args.JsonSave({"state": _checksums(state), "rng": _checksums(rng_tree)}),
            ),
            force=True,
        )

    def restore_latest(
        self, template: TrainState, rng_template: jax.Array
    ) -> tuple[TrainState, jax.Array, dict[str, Any]] | None:
        """The latest finalized checkpoint, or ``None`` when there is none.

        Waits for pending saves first.  Arrays are restored with the dtypes and
        shardings of the templates.

        Args:
          template: a train state of the run's structure, e.g. a fresh
            :func:`~cdvft_jax.init_train_state`; its values are not read.
          rng_template: a key of the run's kind (typed or raw, same PRNG impl).

        Returns:
          ``(state, rng, data_position)``, or ``None``.

        Raises:
          ValueError: if the templates do not fit the checkpoint (another
            optimizer, model or config).
          CorruptCheckpointError: if the latest step is incomplete or its
            arrays fail their checksums; delete that step directory to resume
            from the one before.
        """
        self._manager.wait_until_finished()
        step = self._manager.latest_step()
        if step is None:
            return None
        where = os.path.join(self.directory, str(step))
        rng_tree = _rng_tree(rng_template)
        try:
            checksums = self._manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore())).checksums
        # KeyError: no checksums item; ValueError: unreadable JSON.
        except (KeyError, FileNotFoundError, ValueError) as e:
            raise CorruptCheckpointError(f"checkpoint {where} is incomplete: {e}") from e
        _check_template(checksums["state"], template, where)
        _check_template(checksums["rng"], rng_tree, where)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(template),
                    rng=ocp.args.StandardRestore(rng_tree),
                    data=ocp.args.JsonRestore(),
                ),
            )
        # TensorStore reports missing or truncated array files as a bare Exception.
        except Exception as e:
            raise CorruptCheckpointError(f"checkpoint {where} cannot be read (missing or damaged files?): {e}") from e
        for name, tree in (("state", restored.state), ("rng", restored.rng)):
            bad = [p for p, r in _checksums(tree).items() if r["crc32"] != checksums[name][p]["crc32"]]
            if bad:
                raise CorruptCheckpointError(f"checkpoint {where} is corrupted: checksum mismatch in {name}{bad[:4]}")
        rng = restored.rng["key_data"]
        if _is_typed_key(rng_template):
            rng = jax.random.wrap_key_data(rng, impl=jax.random.key_impl(rng_template))
        return restored.state, rng, restored.data

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk.

        Raises:
          CheckpointWriteError: if a pending save failed (e.g. the disk is full).
        """
        with self._naming_write_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads.

        Raises:
          CheckpointWriteError: if a pending save failed (e.g. the disk is full).
        """
        with self._naming_write_errors():
            self._manager.close()

    @contextlib.contextmanager
    def _naming_write_errors(self) -> Iterator[None]:
        # An asynchronous save fails in its thread; Orbax re-raises the error at the next save or wait.
        try:
            yield
        except OSError as e:
            if isinstance(e, CheckpointWriteError):
                raise
            self._discard_unfinished_steps()
            steps = sorted(self._finalized_steps())
            kept = f"steps {', '.join(map(str, steps))} stay loadable" if steps else "no earlier step was saved"
            raise CheckpointWriteError(
                f"could not write a checkpoint in {self.directory}: {e}; the step being written is discarded and "
                f"{kept}. Free space (or fix the folder) and resume."
            ) from e

    def _discard_unfinished_steps(self, quiet_s: float = 2.0, timeout_s: float = 60.0) -> None:
        # Orbax stops waiting at a save's first failed item, while the other items' array writes go on in
        # background threads. Deleting the failed step's temporary directory only once nothing has written
        # into it for quiet_s keeps those writes from racing the next save's cleanup of the same step (a
        # run resumed in the same process). Past timeout_s it is left to the next checkpointer's cleanup.
        pattern = os.path.join(glob.escape(self.directory), "*.orbax-checkpoint-tmp*")
        deadline, last, quiet_since = time.monotonic() + timeout_s, None, time.monotonic()
        while (unfinished := glob.glob(pattern)) and time.monotonic() < deadline:
            files = sorted(
                (path, stat.st_size, stat.st_mtime_ns)
                for folder in unfinished
                for path in glob.glob(os.path.join(glob.escape(folder), "**"), recursive=True)
                if (stat := _stat_or_none(path)) is not None
            )
            if files != last:
                last, quiet_since = files, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                for folder in unfinished:
                    shutil.rmtree(folder, ignore_errors=True)
            time.sleep(0.1)

    def _finalized_steps(self) -> list[int]:
        return [int(p) for p in os.listdir(self.directory) if p.isdigit()] if os.path.isdir(self.directory) else []

    def __enter__(self) -> TrainingCheckpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
