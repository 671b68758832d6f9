"""One process of a multi-process ``python -m train.text`` run, for tests/test_train_text.py.

    python tests/text_process.py [--stop-at STEP] TRAIN_TEXT_FLAGS...

Runs ``train.text.main(TRAIN_TEXT_FLAGS)``, with two test hooks:

* ``--stop-at STEP`` interrupts the run (``KeyboardInterrupt``, exit status 3) when the sharded train
  step is called on the state of step ``STEP``, as a killed job would be; checkpoints started before
  are finished first, as in a real interruption.
* a process other than 0 records every file it opens for writing under ``--output-dir``, outside
  ``checkpoints/`` (where every process takes part in an Orbax save), and prints the list after
  :data:`MARKER` on exit: only process 0 may write the run's files, so the test expects ``[]``.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import sys
from pathlib import Path

MARKER = "WRITES-OUTSIDE-PROCESS-0:"


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def main(argv: list[str]) -> int:
    stop_at = None
    if argv[:1] == ["--stop-at"]:
        stop_at, argv = int(argv[1]), argv[2:]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cdvft_jax
    from cdvft_jax import sharding
    from train import text

    if stop_at is not None:
        real = sharding.make_sharded_train_step

        def make_interrupted_step(*args, **kwargs):
            step = real(*args, **kwargs)

            def interrupted(state, *rest):
                if int(state.step) == stop_at:
                    raise KeyboardInterrupt
                return step(state, *rest)

            return interrupted

        sharding.make_sharded_train_step = make_interrupted_step

    writes: list[str] = []
    if _flag(argv, "--process-id") not in (None, "0"):
        output = Path(_flag(argv, "--output-dir")).resolve()
        real_open = io.open

        def recording_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                path = Path(file).resolve()
                if output in path.parents and path.relative_to(output).parts[0] != "checkpoints":
                    writes.append(str(path))
            return real_open(file, mode, *args, **kwargs)

        io.open = builtins.open = recording_open
        real_save_adapter = cdvft_jax.save_adapter

        def recording_save_adapter(directory, *args, **kwargs):
            writes.append(str(directory))
            return real_save_adapter(directory, *args, **kwargs)

        cdvft_jax.save_adapter = recording_save_adapter  # safetensors writes without open()
    try:
        text.main(argv)
    except KeyboardInterrupt:
        return 3
    finally:
        print(MARKER + json.dumps(writes), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
