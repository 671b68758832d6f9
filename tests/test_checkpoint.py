"""TrainingCheckpointer: bitwise resume, hard kills, unfinished and corrupted steps, and what is written."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from checkpoint_worker import RUN_SEED, SAVE_EVERY, make_run, state_arrays, train
from conftest import TEXT
from transformers import FlaxRobertaForSequenceClassification, RobertaConfig

import cdvft_jax
from cdvft_jax import CDVFTConfig
from cdvft_jax.checkpoint import CorruptCheckpointError, TrainingCheckpointer

WORKER = Path(__file__).with_name("checkpoint_worker.py")
STEPS = 8
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # how orbax 0.12 names a step directory until the save is finalized


@pytest.fixture(scope="module")
def run():
    return make_run()


@pytest.fixture(scope="module")
def straight(run):
    """The state after an uninterrupted run of ``STEPS`` steps."""
    return state_arrays(train(run, STEPS)[0])


@pytest.fixture(scope="module")
def saved(run, tmp_path_factory):
    """A checkpoint directory holding steps 2, 4 and 6."""
    directory = tmp_path_factory.mktemp("saved")
    with TrainingCheckpointer(directory, save_every=SAVE_EVERY) as checkpointer:
        train(run, 6, checkpointer)
    assert sorted(os.listdir(directory)) == ["2", "4", "6"]
    return directory


def steps_on_disk(directory: Path) -> list[int]:
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def position_after(steps: int) -> dict[str, int]:
    return {"epoch": steps // 3, "batch": steps % 3}


def assert_bitwise_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


def test_resume_continues_bitwise_like_a_straight_run(run, straight, tmp_path):
    with TrainingCheckpointer(tmp_path, save_every=SAVE_EVERY) as checkpointer:
        train(run, 5, checkpointer, save_last=False)
    assert steps_on_disk(tmp_path) == [2, 4]

    with TrainingCheckpointer(tmp_path, save_every=SAVE_EVERY) as checkpointer:
        state, resumed_step, resumed_position = train(run, STEPS, checkpointer, resume=True)
    assert (resumed_step, resumed_position) == (4, position_after(4))
    assert_bitwise_equal(state_arrays(state), straight)

    with TrainingCheckpointer(tmp_path, save_every=SAVE_EVERY) as checkpointer:
        state, rng, position = checkpointer.restore_latest(run.init_state(), jax.random.key(0))
    assert int(state.step) == STEPS and position == position_after(STEPS)
    assert jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(RUN_SEED)))


def test_a_hard_killed_run_resumes_from_its_last_finalized_checkpoint(straight, tmp_path):
    directory, out = tmp_path / "checkpoints", tmp_path / "final.npz"
    with open(tmp_path / "killed.log", "w") as log:
        # Sleeping after each step makes the kill land while the run trains, not after it.
        killed = subprocess.Popen(
            [sys.executable, str(WORKER), str(directory), "--steps", "1000", "--sleep", "0.5"], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 120
        while not (directory.exists() and steps_on_disk(directory) and steps_on_disk(directory)[-1] >= 4):
            assert killed.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint of step >= 4 after 120 s"
            time.sleep(0.05)
        os.kill(killed.pid, signal.SIGKILL)
        assert killed.wait(timeout=30) == -signal.SIGKILL

    resumed = subprocess.run(
        [sys.executable, str(WORKER), str(directory), "--steps", str(STEPS), "--resume", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert 4 <= report["resumed_step"] < STEPS
    assert report["resumed_position"] == position_after(report["resumed_step"])
    with np.load(out) as final:
        assert_bitwise_equal(dict(final), straight)


def test_an_unfinished_step_is_never_restored(run, saved, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    # Step 6 complete on disk but never renamed: what a process killed just before finalizing leaves.
    (directory / "6").rename(directory / f"6{TMP_SUFFIX}")
    (directory / f"8{TMP_SUFFIX}-1234").mkdir()  # the suffixed form of other orbax versions
    with TrainingCheckpointer(directory, save_every=SAVE_EVERY) as checkpointer:
        state, rng, position = checkpointer.restore_latest(run.init_state(), jax.random.key(0))
        assert int(state.step) == 4 and position == position_after(4)
        # Saving step 6 again replaces the unfinished one; opening the directory deleted the other.
        assert checkpointer.maybe_save(6, state, rng, position)
    assert sorted(os.listdir(directory)) == ["2", "4", "6"]


class _BackgroundWriter(threading.Thread):
    """What orbax's background array writes do after a save's first item failed: more files, for a while."""

    def __init__(self, folder: Path, seconds: float) -> None:
        super().__init__()
        self.folder, self.seconds = folder, seconds
        self.errors: list[OSError] = []
        self.writing = threading.Event()  # set after the first write, so no test races the thread's start

    def run(self) -> None:
        try:
            end = time.monotonic() + self.seconds
            while time.monotonic() < end:
                (self.folder / f"chunk_{time.monotonic_ns()}").write_bytes(b"x" * 64)
                self.writing.set()
                time.sleep(0.05)
        except OSError as e:
            self.errors.append(e)
        finally:
            self.writing.set()


def _gone_within(path: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not path.exists()


@pytest.fixture
def checkpointer_with_a_failed_step(tmp_path):
    """An open checkpointer and the temporary folder of a step whose save failed (created after opening:
    opening deletes earlier runs' unfinished steps in a background thread, so first wait for a sentinel
    to be gone)."""
    sentinel = tmp_path / f"5{TMP_SUFFIX}-sentinel"
    sentinel.mkdir()
    with TrainingCheckpointer(tmp_path, save_every=SAVE_EVERY) as checkpointer:
        assert _gone_within(sentinel, seconds=30)
        unfinished = tmp_path / f"6{TMP_SUFFIX}-1234"
        unfinished.mkdir()
        yield checkpointer, unfinished


def _discard_while_writing(checkpointer_with_a_failed_step, writing_s: float, timeout_s: float) -> _BackgroundWriter:
    """Discards the failed step while a writer keeps writing into it for ``writing_s``; returns the writer,
    still running or not, as the discard left it."""
    checkpointer, unfinished = checkpointer_with_a_failed_step
    writer = _BackgroundWriter(unfinished, seconds=writing_s)
    writer.start()
    writer.writing.wait()
    checkpointer._discard_unfinished_steps(quiet_s=1.0, timeout_s=timeout_s)
    return writer


def test_a_failed_step_is_deleted_only_once_its_background_writes_have_stopped(checkpointer_with_a_failed_step):
    _, unfinished = checkpointer_with_a_failed_step
    writer = _discard_while_writing(checkpointer_with_a_failed_step, writing_s=1.5, timeout_s=30.0)
    writer_still_running = writer.is_alive()
    writer.join()
    assert not writer_still_running and writer.errors == []  # deleted after the last write, never under it
    assert not unfinished.exists()


def test_a_step_still_being_written_at_the_timeout_is_left_to_the_next_cleanup(checkpointer_with_a_failed_step):
    _, unfinished = checkpointer_with_a_failed_step
    # Quiet for 1 s would be enough to delete it within the 2.5 s timeout; only the writes keep it.
    writer = _discard_while_writing(checkpointer_with_a_failed_step, writing_s=5.0, timeout_s=2.5)
    assert unfinished.is_dir() and writer.is_alive()
    writer.join()
    assert writer.errors == []
    with TrainingCheckpointer(unfinished.parent, save_every=SAVE_EVERY):
        assert _gone_within(unfinished, seconds=30)  # opening the directory again deletes it, as for a killed run


def _empty(step_dir: Path) -> None:
    for path in step_dir.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _array_files(step_dir: Path) -> list[Path]:
    return list((step_dir / "state" / "ocdbt.process_0" / "d").iterdir())


def _truncate(step_dir: Path) -> None:
    for path in _array_files(step_dir):
        os.truncate(path, 10)


def _state_of_step_4(step_dir: Path) -> None:
    # Readable arrays of the wrong values: orbax restores them without complaint, only the checksums notice.
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.parent / "4" / "state", step_dir / "state")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_empty, "incomplete"),
        (lambda step_dir: shutil.rmtree(step_dir / "state"), "cannot be read"),
        (_state_of_step_4, "checksum mismatch"),
    ],
    ids=["emptied", "state-deleted", "state-of-another-step"],
)
def test_a_damaged_step_raises_a_clear_error(run, saved, tmp_path, damage, message):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    damage(directory / "6")
    with TrainingCheckpointer(directory, save_every=SAVE_EVERY) as checkpointer:
        with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(directory / '6'))}.*{message}"):
            checkpointer.restore_latest(run.init_state(), jax.random.key(0))


def test_truncated_array_files_raise_a_clear_error(saved, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    _truncate(directory / "6")
    # In a process of its own: when an array read fails, orbax abandons the other reads, and pytest would report
    # their coroutines as unraisable exceptions in whichever test runs when they are finally collected.
    resumed = subprocess.run(
        [sys.executable, str(WORKER), str(directory), "--steps", str(STEPS), "--resume"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert report["error"] == "CorruptCheckpointError"
    assert report["message"].startswith(f"checkpoint {directory / '6'} cannot be read"), report["message"]


def test_a_template_of_another_run_is_rejected(run, saved):
    other = cdvft_jax.init_train_state(run.init_state().trainable, optax.sgd(0.1, momentum=0.9))
    with TrainingCheckpointer(saved, save_every=SAVE_EVERY) as checkpointer:
        with pytest.raises(ValueError, match="does not fit"):
            checkpointer.restore_latest(other, jax.random.key(0))


def test_keeps_the_newest_steps_and_writes_only_the_trainable_state(tmp_path):
    # A realistic vocabulary: the frozen embeddings dwarf the adapter, as in a real model.
    model = FlaxRobertaForSequenceClassification(RobertaConfig(**{**TEXT, "vocab_size": 50265}), seed=0)
    adapted = cdvft_jax.inject(model, CDVFTConfig(modules_to_save=["classifier"]))
    trainable, frozen = adapted.split(adapted.init(jax.random.key(0), model.params))
    state = cdvft_jax.init_train_state(trainable, cdvft_jax.adapter_optimizer(adapted, adapter_learning_rate=1e-2))
    rng = jax.random.PRNGKey(3)  # a raw uint32 key round-trips too

    with TrainingCheckpointer(tmp_path, save_every=2, max_to_keep=2) as checkpointer:
        saved = [s for s in range(1, 10) if checkpointer.maybe_save(s, state, rng, {"epoch": 0, "batch": s})]
        assert checkpointer.maybe_save(9, state, rng, {"epoch": 0, "batch": 9}, force=True)
        assert not checkpointer.maybe_save(9, state, rng, {"epoch": 0, "batch": 9}, force=True)
    assert saved == [2, 4, 6, 8]
    assert sorted(os.listdir(tmp_path)) == ["8", "9"]

    written = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    frozen_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(frozen))
    assert written < 0.1 * frozen_bytes, (written, frozen_bytes)

    with TrainingCheckpointer(tmp_path, save_every=2) as checkpointer:
        _, restored_rng, position = checkpointer.restore_latest(state, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(restored_rng, rng)
    assert position == {"epoch": 0, "batch": 9}
