"""``python -m train.text`` that SIGKILLs itself at a chosen point, for tests/test_faults.py.

    python tests/fault_process.py POINT N TRAIN_TEXT_FLAGS...

POINT is where the process dies, at its N-th occurrence (counting from 1):

* ``step``: when the train step is called on the state of step N (mid-training);
* ``checkpoint``: right after the N-th checkpoint save has started, while its files are being written;
* ``log``: half-way through writing the N-th line of ``metrics.jsonl``;
* ``adapter``: half-way through writing the N-th file of the adapter (1: the tensors, 2: the config).

A SIGKILL runs no cleanup (no ``finally``, no ``atexit``, no waiting for asynchronous saves), as when a
machine is preempted; the test then resumes the run and compares it with an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(point: str, occurrence: int, argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cdvft_jax
    from cdvft_jax import adapter_io
    from cdvft_jax.checkpoint import TrainingCheckpointer
    from train import hooks, text

    seen = 0

    def count() -> bool:
        nonlocal seen
        seen += 1
        return seen == occurrence

    if point == "step":
        real_make = cdvft_jax.make_train_step

        def make_dying_step(*args, **kwargs):
            step = real_make(*args, **kwargs)

            def dying(state, *rest):
                if int(state.step) == occurrence:
                    die()
                return step(state, *rest)

            return dying

        cdvft_jax.make_train_step = make_dying_step
    elif point == "checkpoint":
        real_save = TrainingCheckpointer.maybe_save

        def dying_save(self, *args, **kwargs):
            started = real_save(self, *args, **kwargs)
            if started and count():
                die()
            return started

        TrainingCheckpointer.maybe_save = dying_save
    elif point == "log":
        real_append = hooks.append_jsonl

        def dying_append(path, record):
            if count():
                line = json.dumps(record) + "\n"
                with path.open("a") as f:
                    f.write(line[: len(line) // 2])
                die()
            real_append(path, record)

        hooks.append_jsonl = dying_append
    elif point == "adapter":
        real_write = adapter_io._write_durably

        def dying_write(path, data):
            if count():
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                die()
            real_write(path, data)

        adapter_io._write_durably = dying_write
    else:
        raise SystemExit(f"unknown fault point {point!r}")
    text.main(argv)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
