"""SIGKILL at any point of a run, then ``--resume``: the run ends bitwise as an uninterrupted one.

Each case kills a real ``python -m train.text`` process (tests/fault_process.py) at one point: mid-training,
while a checkpoint is being written, half-way through a log line, half-way through each adapter file.
"""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import cdvft_jax
from train import text

HERE = Path(__file__).resolve().parent
# (point, occurrence): the train step of state 5 (the last checkpoint is step 4), the second checkpoint
# save (step 4) while it is written, the second log line (after epoch 1), each of the adapter's two files.
FAULTS = [("step", 5), ("step", 11), ("checkpoint", 2), ("log", 2), ("adapter", 1), ("adapter", 2)]


def flags(tmp_path: Path, tiny_model: Path, out: Path) -> list[str]:
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    rows = ["text,label"] + [f"{words[i % 6]} film {i},{'pos' if i % 6 < 3 else 'neg'}" for i in range(64)]
    (tmp_path / "train.csv").write_text("\n".join(rows[:49]) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join([rows[0], *rows[49:]]) + "\n")
    return [
        *("--model", str(tiny_model), "--output-dir", str(out), "--task", "custom"),
        *("--train-file", str(tmp_path / "train.csv"), "--eval-file", str(tmp_path / "dev.csv")),
        *("--batch-size", "8", "--epochs", "2", "--max-length", "16", "--checkpoint-every", "2"),
    ]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model) -> Path:
    folder = tmp_path_factory.mktemp("straight")
    out = folder / "out"
    text.main(flags(folder, tiny_model, out))
    return out


def outcome(out: Path) -> tuple[dict[str, np.ndarray], list[dict], dict]:
    tensors = safetensors.numpy.load_file(out / "adapter" / "adapter_model.safetensors")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    return tensors, log, {k: results[k] for k in ("best", "best_epoch", "before", "trainable_params")}


@pytest.mark.parametrize(("point", "occurrence"), FAULTS)
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path, tiny_model, straight, point, occurrence):
    out = tmp_path / "out"
    run_flags = flags(tmp_path, tiny_model, out)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    killed = subprocess.run(
        [sys.executable, str(HERE / "fault_process.py"), point, str(occurrence), *run_flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    text.main([*run_flags, "--resume"])
    tensors, log, results = outcome(out)
    expected_tensors, expected_log, expected_results = outcome(straight)
    assert log == expected_log and results == expected_results
    assert tensors.keys() == expected_tensors.keys()
    for key, value in expected_tensors.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)


def test_a_full_disk_during_a_checkpoint_is_named_and_the_run_resumes_from_the_last_good_one(
    tmp_path, tiny_model, straight, monkeypatch
):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    real_save = json_checkpoint_handler.JsonCheckpointHandler._save_fn
    calls = 0

    def fills_up(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls >= 3:  # each checkpoint writes two JSON items: the second checkpoint finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", fills_up)
    out = tmp_path / "out"
    run_flags = flags(tmp_path, tiny_model, out)
    with pytest.raises(cdvft_jax.CheckpointWriteError, match=r"No space left on device.*steps 2 stay loadable"):
        text.main(run_flags)
    assert not (out / "adapter").exists() and not (out / "results.json").exists()
    monkeypatch.undo()
    text.main([*run_flags, "--resume"])
    tensors, log, results = outcome(out)
    expected_tensors, expected_log, expected_results = outcome(straight)
    assert log == expected_log and results == expected_results
    for key, value in expected_tensors.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)


def test_a_full_disk_during_the_adapter_save_is_named_and_the_resumed_run_saves_it(
    tmp_path, tiny_model, straight, monkeypatch
):
    from cdvft_jax import adapter_io

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_io, "_write_durably", full_disk)
    out = tmp_path / "out"
    run_flags = flags(tmp_path, tiny_model, out)
    with pytest.raises(cdvft_jax.AdapterWriteError, match=rf"adapter in {out / 'adapter'}: .*No space left"):
        text.main(run_flags)
    assert not (out / "results.json").exists()
    monkeypatch.undo()
    text.main([*run_flags, "--resume"])  # from the last checkpoint, the final step's: only the save is redone
    tensors, log, results = outcome(out)
    expected_tensors, expected_log, expected_results = outcome(straight)
    assert log == expected_log and results == expected_results
    for key, value in expected_tensors.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)
