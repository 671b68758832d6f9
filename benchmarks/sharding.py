"""Per-device frozen-parameter memory and a sharded CDVFT train step over data / FSDP meshes.

For each device count (1, 2, 4, 8) this runs a fresh subprocess with that many
fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``: the
device count is fixed when jax is imported), builds the RoBERTa-base-shaped
model of :mod:`benchmarks.step_time` with CDVFT on query/value, shards the
frozen tree with :func:`cdvft_jax.sharding.frozen_partition_specs` and
:func:`cdvft_jax.sharding.shard_params` for every mesh layout of that size, and
reports the frozen bytes held by device 0, whether the sharded train step
compiled and ran, and its median step time.  The step time is a sanity figure
only: the fake devices share the host's cores.

Running it
----------
From the repository root::

    python -m benchmarks.sharding --small            # tiny model, seconds
    python -m benchmarks.sharding --steps 2 --json out.json

The child mode (``--child N --layouts "data=2,fsdp=2;fsdp=4"``) prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import log
from train.cli import ConfigError, Ints, check_count, check_distinct, parse

LAYOUTS: dict[int, list[str]] = {
    1: ["data=1"],
    2: ["data=2", "fsdp=2"],
    4: ["data=4", "data=2,fsdp=2", "fsdp=4"],
    8: ["data=8", "data=2,fsdp=4", "fsdp=8"],
}
REPO_ROOT = Path(__file__).resolve().parents[1]


def device0_bytes(tree: Any) -> int:
    """Bytes of ``tree``'s shards that live on device 0."""
    import jax

    device = jax.devices()[0]
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


def run_layout(layout: str, args: ShardingConfig, model: Any) -> dict[str, Any]:
    """Shards the frozen tree for one mesh layout and times the sharded step."""
    import jax
    import numpy as np

    import cdvft_jax
    from benchmarks.common import SEED, make_batch, method_parts
    from cdvft_jax.sharding import make_mesh, parse_mesh, shard_batch, shard_training

    trainable, frozen, optimizer, loss_fn = method_parts("cdvft", model)

    mesh = make_mesh(parse_mesh(layout))
    result: dict[str, Any] = {
        "devices": jax.device_count(),
        "mesh": layout,
        "frozen_bytes_total": sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(frozen)),
        "frozen_bytes_device0": None,
        "compiled": False,
        "ms_per_step": None,
        "error": None,
    }
    try:
        run = shard_training(loss_fn, optimizer, cdvft_jax.init_train_state(trainable, optimizer), frozen, mesh)
        state, step, frozen = run.state, run.train_step, run.frozen
        result["frozen_bytes_device0"] = device0_bytes(frozen)
        batch = shard_batch(make_batch(model.config.vocab_size, args.batch, args.seq_len), mesh)
        rng = jax.random.key(SEED)
        start = time.perf_counter()
        state, metrics = step(state, frozen, batch, rng)
        jax.block_until_ready((state, metrics))
        log(f"  {layout}: compiled and ran the first step in {time.perf_counter() - start:.1f} s")
        times = []
        for k in range(args.steps):
            start = time.perf_counter()
            state, metrics = step(state, frozen, batch, jax.random.fold_in(rng, k))
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss is {loss}")
        result["compiled"] = True
        result["loss"] = loss
        result["ms_per_step"] = 1e3 * statistics.median(times) if times else None
    except Exception as err:  # reported in the table, not fatal
        result["error"] = f"{type(err).__name__}: {err}"[:500]
        log(f"  {layout}: FAILED {result['error']}")
    return result


def child(args: ShardingConfig) -> None:
    """Child mode: every layout of ``--layouts`` on this process's devices; one JSON line on stdout."""
    import jax

    from benchmarks.common import build_model

    if jax.device_count() != args.child:
        raise RuntimeError(f"expected {args.child} devices, got {jax.device_count()}")
    model = build_model(args.small)
    results = [run_layout(layout, args, model) for layout in args.layouts.split(";")]
    print(json.dumps(results))


def run_child(devices: int, args: ShardingConfig) -> list[dict[str, Any]]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    command = [
        sys.executable,
        "-m",
        "benchmarks.sharding",
        "--child",
        str(devices),
        "--layouts",
        ";".join(LAYOUTS[devices]),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--seq-len",
        str(args.seq_len),
    ]
    if args.small:
        command.append("--small")
    log(f"{devices} device(s): {', '.join(LAYOUTS[devices])}")
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"child with {devices} devices failed with exit code {done.returncode}")
    return json.loads(lines[-1])


def markdown(results: Sequence[dict[str, Any]], args: ShardingConfig) -> str:
    base = next((r["frozen_bytes_device0"] for r in results if r["devices"] == 1), None)
    rows = [
        f"{'roberta-small-smoke' if args.small else 'roberta-base-shaped'}, CDVFT on query/value, "
        f"batch {args.batch} x {args.seq_len}, {args.steps} timed steps (fake CPU devices share the cores)",
        "",
        "| devices | mesh | frozen MB / device | ratio to 1 device | compiled | ms/step |",
        "|---:|---|---:|---:|---|---:|",
    ]
    for r in results:
        ratio = "-" if not base else f"{r['frozen_bytes_device0'] / base:.3f}"
        ms = "-" if r["ms_per_step"] is None else f"{r['ms_per_step']:.1f}"
        rows.append(
            f"| {r['devices']} | {r['mesh']} | {r['frozen_bytes_device0'] / 1e6:.2f} | {ratio} "
            f"| {'yes' if r['compiled'] else 'no'} | {ms} |"
        )
    if results:
        rows.append("")
        rows.append(f"total frozen: {results[0]['frozen_bytes_total'] / 1e6:.2f} MB")
    return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """Per-device frozen memory and a sharded CDVFT step over data / FSDP meshes of fake CPU devices.

    Attributes:
      small: a tiny RoBERTa, for a smoke run.
      steps: timed steps after one warm-up.
      batch: sequences per global batch.
      seq_len: tokens per sequence (None: 128; 32 with --small).
      devices: the device counts, out of 1, 2, 4 and 8.
      json: also write the results here as JSON.
      child: (internal: what a subprocess runs) the device count of this process.
      layouts: (internal) the mesh layouts the child runs, separated by ';'.
    """

    small: bool = False
    steps: int = 2
    batch: int = 16
    seq_len: int | None = None
    devices: Ints = tuple(LAYOUTS)
    json: Path | None = None
    child: int | None = None
    layouts: str | None = None

    def __post_init__(self) -> None:
        check_count(self.steps, "steps")
        check_count(self.batch, "batch")
        check_count(self.seq_len, "seq_len", optional=True)
        check_distinct(self.devices, "devices", low=1)
        unknown = sorted(set(self.devices) - set(LAYOUTS))
        if unknown:
            raise ConfigError(f"--devices: unsupported device counts {unknown}; choose from {sorted(LAYOUTS)}")
        if self.seq_len is None:  # the documented default depends on --small
            object.__setattr__(self, "seq_len", 32 if self.small else 128)


def parse_args(argv: Sequence[str] | None = None) -> ShardingConfig:
    """The command line of ``python -m benchmarks.sharding``."""
    description = ShardingConfig.__doc__.split("\n")[0]
    return parse(ShardingConfig, argv, prog="python -m benchmarks.sharding", description=description)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child(args)
        return
    start = time.perf_counter()
    results = [r for n in args.devices for r in run_child(n, args)]
    print(markdown(results, args))
    log(f"wall time {time.perf_counter() - start:.1f} s")
    if args.json:
        settings = dataclasses.asdict(args) | {"json": str(args.json)}
        args.json.write_text(json.dumps({"args": settings, "results": results}, indent=2))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
