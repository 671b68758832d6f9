"""Data-parallel and FSDP training over a device mesh, built on ``jax.sharding``.

A CDVFT run has a large frozen base and a tiny trainable state (adapter
vectors and a task head), so the layout is asymmetric:

* the frozen tree is FSDP-sharded: each large kernel or embedding is split
  along one dimension over the ``fsdp`` mesh axis (:func:`frozen_partition_specs`)
  and placed once with :func:`shard_params`; it is then passed to every step
  as an argument, never copied again;
* the trainable state (and the optimizer moments that mirror it) is
  replicated (:func:`trainable_partition_specs`, :func:`state_shardings_for`):
  it is a few hundred KB, and replicas make the update purely local;
* the batch is split along its leading axis over *both* mesh axes
  (:func:`batch_spec`), so every device computes on its own examples.  The
  hidden axis is left whole, so each CDV layer's FFT can run on local data.

The mesh has two axes, ``data`` and ``fsdp``; :func:`parse_mesh` reads the
``"data=2,fsdp=4"`` form of a command line.  The train step of
:func:`make_sharded_train_step` is :func:`~cdvft_jax.make_train_step`'s step,
jitted with those shardings; XLA inserts the all-gathers of the frozen shards
and the all-reduce of the trainable gradients.

Example:
  Sharding a run over every device, half of them FSDP (with ``trainable``,
  ``frozen``, ``optimizer``, ``loss_fn`` and host ``batches`` as for
  :func:`~cdvft_jax.make_train_step`); :func:`shard_training` does the placing
  and builds the step::

    mesh = make_mesh(parse_mesh(f"data=2,fsdp={jax.device_count() // 2}"))
    run = shard_training(loss_fn, optimizer, init_train_state(trainable, optimizer), frozen, mesh)
    state = run.state
    for k, batch in enumerate(batches):
        state, metrics = run.train_step(state, run.frozen, shard_batch(batch, mesh), jax.random.fold_in(rng, k))
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from cdvft_jax.params import Params
from cdvft_jax.training import LossFn, TrainState, make_train_step

__all__ = [
    "MESH_AXES",
    "ShardedTraining",
    "batch_spec",
    "frozen_partition_specs",
    "global_batch_from_local",
    "is_main_process",
    "local_rows",
    "make_mesh",
    "make_sharded_train_step",
    "maybe_initialize_distributed",
    "parse_mesh",
    "process_batch_slice",
    "shard_batch",
    "shard_params",
    "shard_training",
    "shardings_of",
    "state_shardings_for",
    "trainable_partition_specs",
]

MESH_AXES: tuple[str, str] = ("data", "fsdp")
"""The mesh axis names, outermost first: pure data parallelism, then FSDP."""


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _path_str(path: jax.tree_util.KeyPath) -> str:
    # The "/"-joined form of params.flat_params, e.g. "roberta/encoder/layer/0/attention/self/query/kernel".
    return jax.tree_util.keystr(path, simple=True, separator="/")


def parse_mesh(spec: str | None) -> dict[str, int]:
    """Axis sizes from a ``"data=2,fsdp=4"`` string; a missing axis has size 1.

    Args:
      spec: comma-separated ``axis=size`` entries over the axes ``data`` and
        ``fsdp``.  ``None`` or an empty string puts every device on ``data``.

    Returns:
      ``{"data": d, "fsdp": f}``; :func:`make_mesh` checks it against the devices.

    Raises:
      ValueError: on an unknown axis, a repeated axis, or a size that is not
        a positive integer.

    >>> parse_mesh("fsdp=4, data=2")
    {'data': 2, 'fsdp': 4}
    >>> parse_mesh("fsdp=1")
    {'data': 1, 'fsdp': 1}
    """
    if spec is None or not spec.strip():
        return {"data": jax.device_count(), "fsdp": 1}
    axes: dict[str, int] = {}
    for entry in spec.split(","):
        name, sep, size = (part.strip() for part in entry.partition("="))
        if not sep or not size.lstrip("-").isdigit():
            raise ValueError(f"mesh {spec!r}: expected comma-separated 'axis=size' entries, got {entry.strip()!r}")
        if name not in MESH_AXES:
            raise ValueError(f"mesh {spec!r}: unknown axis {name!r}; the axes are {list(MESH_AXES)}")
        if name in axes:
            raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice")
        axes[name] = int(size)
    sizes = {name: axes.get(name, 1) for name in MESH_AXES}
    bad = {name: size for name, size in sizes.items() if size < 1}
    if bad:
        raise ValueError(f"mesh {spec!r}: axis sizes must be positive, got {bad}")
    return sizes


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over all devices (or ``devices``).

    The axes are ``Auto``: shardings are given to ``jit`` and XLA propagates
    them through the model, which needs no sharding annotations of its own.

    Args:
      axes: sizes by axis name, e.g. from :func:`parse_mesh`; a missing axis has size 1.
      devices: the devices to use; defaults to ``jax.devices()`` (every
        process's devices), laid out by ``jax.make_mesh``.

    Raises:
      ValueError: on an unknown axis name, a non-positive size, or sizes
        whose product is not the number of devices.
    """
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh {dict(axes)}: unknown axes {unknown}; the axes are {list(MESH_AXES)}")
    shape = tuple(axes.get(name, 1) for name in MESH_AXES)
    num_devices = jax.device_count() if devices is None else len(devices)
    where = "jax.device_count()" if devices is None else "len(devices)"
    if any(size < 1 for size in shape):
        raise ValueError(f"mesh {dict(axes)}: axis sizes must be positive ({where} = {num_devices})")
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} has {math.prod(shape)} devices, "
            f"but {where} = {num_devices}; the axis sizes must multiply to the device count"
        )
    # jax.make_mesh defaults to Explicit axes (sharding in types), which would
    # ask every op of the model for a sharding rule.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices is None:
        return jax.make_mesh(shape, MESH_AXES, axis_types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types)


def frozen_partition_specs(
    frozen_params: Params,
    mesh: Mesh | AbstractMesh,
    *,
    min_size: int = 2**14,
    overrides: Sequence[tuple[str, PartitionSpec]] = (),
) -> Any:
    """FSDP partition specs for the frozen tree: large leaves split over ``fsdp``, the rest replicated.

    A leaf with at least ``min_size`` elements and two or more dimensions
    (kernels, embeddings) is split along its largest dimension that the
    ``fsdp`` axis size divides, the first such dimension on a tie.  Small
    leaves (biases, LayerNorm scales) and leaves with no divisible dimension
    are replicated: splitting them saves little memory and costs a gather.

    Args:
      frozen_params: the frozen tree (arrays or ``jax.ShapeDtypeStruct``).
      mesh: the mesh from :func:`make_mesh`; only its ``fsdp`` size is read, so
        a ``jax.sharding.AbstractMesh`` does as well.
      min_size: the number of elements from which a leaf is split.
      overrides: ``(regex, spec)`` pairs tried first, in order; the first
        regex that matches the whole ``/``-joined leaf path (e.g.
        ``r".*/word_embeddings/embedding"``) gives that leaf's spec.

    Returns:
      A tree of ``PartitionSpec`` with the structure of ``frozen_params``.
    """
    fsdp = mesh.shape["fsdp"]
    patterns = [(re.compile(pattern), spec) for pattern, spec in overrides]

    def spec_of(path: jax.tree_util.KeyPath, leaf: Any) -> PartitionSpec:
        name = _path_str(path)
        for pattern, spec in patterns:
            if pattern.fullmatch(name):
                return spec
        shape = tuple(leaf.shape)
        if fsdp == 1 or len(shape) < 2 or math.prod(shape) < min_size:
            return PartitionSpec()
        divisible = [dim for dim, size in enumerate(shape) if size % fsdp == 0]
        if not divisible:
            return PartitionSpec()
        # max() keeps the first of equal candidates, so ties go to the lower dimension.
        dim = max(divisible, key=lambda d: shape[d])
        return PartitionSpec(*(None,) * dim, "fsdp")

    return jax.tree_util.tree_map_with_path(spec_of, frozen_params)


def trainable_partition_specs(trainable: Params) -> Any:
    """Replicated specs for the trainable tree (CDV vectors and the head are tiny)."""
    return jax.tree.map(lambda _: PartitionSpec(), trainable)


def batch_spec() -> PartitionSpec:
    """The batch's spec: the leading (example) axis split over ``data`` and ``fsdp``, the rest local."""
    return PartitionSpec(MESH_AXES)


def shard_params(tree: Params, specs: Any, mesh: Mesh) -> Any:
    """``tree`` placed on ``mesh`` with ``specs`` (a matching tree of ``PartitionSpec``).

    Do it once, before training: the sharded frozen tree is then passed to
    every step as an argument.
    """
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)
    return jax.device_put(tree, shardings)


def shardings_of(tree: Any) -> Any:
    """The ``.sharding`` of every array in ``tree``, e.g. to pass a sharded tree's layout to ``jit``."""
    return jax.tree.map(lambda x: x.sharding, tree)


def state_shardings_for(state: TrainState, mesh: Mesh) -> TrainState:
    """A replicated ``NamedSharding`` for every leaf of ``state``, optimizer moments included.

    Use it to place a state (``jax.device_put(state, shardings)``), as the
    ``state_shardings`` of :func:`make_sharded_train_step`, or as the layout
    of a restore template for :class:`~cdvft_jax.TrainingCheckpointer`.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda _: replicated, state)


def make_sharded_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: Any,
    frozen_shardings: Any,
    batch_sharding: Any,
) -> Callable[[TrainState, Params, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """:func:`~cdvft_jax.make_train_step`'s ``train_step(state, frozen, batch, rng)``, jitted over ``mesh``.

    The state comes in and goes out with ``state_shardings`` (its buffers are
    donated), ``frozen`` keeps ``frozen_shardings``, the batch has
    ``batch_sharding``; the RNG key and the metrics are replicated.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> scalar`` on the full params tree.
      optimizer: the optimizer of the trainable tree.
      mesh: the mesh every sharding lives on.
      state_shardings: e.g. :func:`state_shardings_for`.
      frozen_shardings: a tree of ``NamedSharding`` for the frozen tree, e.g.
        :func:`shardings_of` the output of :func:`shard_params`.
      batch_sharding: one sharding for every batch leaf (e.g.
        ``NamedSharding(mesh, batch_spec())``) or a tree of them.

    Returns:
      The jitted step; ``metrics`` holds ``loss`` and ``finite``, as for
      :func:`~cdvft_jax.make_train_step`.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    # The inner jit is inlined into this one, so the step body lives in one
    # place; donation is decided here, at the outer (top-level) jit.
    step = make_train_step(loss_fn, optimizer, donate=False)
    return jax.jit(
        step,
        in_shardings=(state_shardings, frozen_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


class ShardedTraining(NamedTuple):
    """A run laid out on a mesh by :func:`shard_training`.

    Attributes:
      state: the train state, replicated (:func:`state_shardings_for`).
      frozen: the frozen tree, FSDP-sharded (:func:`frozen_partition_specs`).
      train_step: :func:`make_sharded_train_step`'s step for them, batches split by :func:`batch_spec`.
    """

    state: TrainState
    frozen: Any
    train_step: Callable[[TrainState, Params, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def shard_training(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    frozen: Params,
    mesh: Mesh,
    *,
    min_size: int = 2**14,
) -> ShardedTraining:
    """Places a run on ``mesh`` and builds its step: the one way the programs and benchmarks shard training.

    The frozen tree is FSDP-sharded (leaves of ``min_size`` elements or more, see
    :func:`frozen_partition_specs`), the state replicated, and the step jitted with those layouts and
    batches split over ``data`` x ``fsdp``; pass it batches placed by :func:`shard_batch` (or
    :func:`global_batch_from_local` when each process loads its part).
    """
    frozen = shard_params(frozen, frozen_partition_specs(frozen, mesh, min_size=min_size), mesh)
    state_shardings = state_shardings_for(state, mesh)
    step = make_sharded_train_step(
        loss_fn, optimizer, mesh, state_shardings, shardings_of(frozen), NamedSharding(mesh, batch_spec())
    )
    return ShardedTraining(jax.device_put(state, state_shardings), frozen, step)


def _check_batch_size(mesh: Mesh, global_size: int) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_size % shards:
        raise ValueError(
            f"the global batch size {global_size} is not divisible by the data-parallel size "
            f"data * fsdp = {shards} of mesh {dict(mesh.shape)}"
        )


def _batch_size(batch: Any) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves or any(np.ndim(x) == 0 for x in leaves):
        raise ValueError("a batch must be a non-empty tree of arrays with a leading batch axis (no scalars)")
    sizes = {np.shape(x)[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(f"the batch leaves disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """A host batch (a tree of arrays, leading axis = global batch) placed on ``mesh`` with :func:`batch_spec`.

    Single process only (each process would need the whole batch); use
    :func:`global_batch_from_local` when several processes each load a part.

    Raises:
      ValueError: if the batch size is not divisible by ``data * fsdp``.
    """
    _check_batch_size(mesh, _batch_size(batch))
    return jax.device_put(batch, NamedSharding(mesh, batch_spec()))


def global_batch_from_local(local_batch: Any, mesh: Mesh) -> Any:
    """The global batch of ``mesh`` from this process's part of it.

    Each process passes the examples for its own devices (the global batch is
    every process's part, concatenated in process order), as
    ``jax.make_array_from_process_local_data`` expects.  In a single process
    this is :func:`shard_batch`.

    Raises:
      ValueError: if the global batch size is not divisible by ``data * fsdp``.
    """
    _check_batch_size(mesh, _batch_size(local_batch) * jax.process_count())
    sharding = NamedSharding(mesh, batch_spec())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def process_batch_slice(global_batch_size: int, mesh: Mesh) -> slice:
    """The rows of a global batch that this process's devices hold under :func:`batch_spec`.

    The batch axis is split over the devices of ``mesh`` in its (row-major)
    device order, so a process owns the rows of its own devices.  These rows,
    in order, are the local data ``jax.make_array_from_process_local_data``
    (:func:`global_batch_from_local`) expects from this process.  In a single
    process this is every row.

    Args:
      global_batch_size: the number of examples in the global batch.
      mesh: the mesh from :func:`make_mesh`.

    Returns:
      ``slice(start, stop)``: this process's rows, ``global_batch_size /
      process_count`` of them.

    Raises:
      ValueError: if the batch size is not divisible by ``data * fsdp``, or if
        this process's devices are not one contiguous block of the mesh's
        device order (then its rows would not be one contiguous slice; build
        the mesh with :func:`make_mesh`, or order the devices process by process).
    """
    _check_batch_size(mesh, global_batch_size)
    indices = NamedSharding(mesh, batch_spec()).addressable_devices_indices_map((global_batch_size,))
    ranges = sorted({index[0].indices(global_batch_size)[:2] for index in indices.values()})
    start, stop = ranges[0]
    for lo, hi in ranges[1:]:
        if lo != stop:
            raise ValueError(
                f"process {jax.process_index()} holds the batch rows {[list(r) for r in ranges]} of a global batch "
                f"of {global_batch_size} on mesh {dict(mesh.shape)}, which are not one contiguous block: its devices "
                "are not adjacent in the mesh's device order (build the mesh with make_mesh, or list the devices "
                "process by process)"
            )
        stop = hi
    return slice(start, stop)


def local_rows(batch: Any, mesh: Mesh) -> Any:
    """This process's rows (:func:`process_batch_slice`) of a global host batch, for :func:`global_batch_from_local`.

    When every process builds the same global batch (a tree of arrays with a
    leading batch axis), ``global_batch_from_local(local_rows(batch, mesh),
    mesh)`` is the global batch on ``mesh``, each process copying only its own
    examples to its devices.  In a single process it is :func:`shard_batch`.

    Raises:
      ValueError: as :func:`process_batch_slice`, or if the leaves disagree on the batch size.
    """
    rows = process_batch_slice(_batch_size(batch), mesh)
    return jax.tree.map(lambda x: x[rows], batch)


# Process counts set by SLURM and MPI launchers.
_PROCESS_COUNT_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _env_wants_distributed() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    # A single-task SLURM or MPI job (e.g. an interactive allocation) needs no coordination.
    for var in _PROCESS_COUNT_VARS:
        count = os.environ.get(var, "").strip()
        if count.isdigit() and int(count) > 1:
            return True
    # A TPU pod slice lists one hostname per worker.
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Calls ``jax.distributed.initialize`` when a multi-process run asks for it.

    A run asks for it with any argument (e.g. from the ``--coordinator``,
    ``--num-processes`` and ``--process-id`` flags) or through the launcher's
    environment: ``JAX_COORDINATOR_ADDRESS``, a SLURM or MPI job of several
    tasks, or a TPU pod slice of several hosts.  JAX fills in what is not given
    from that environment: on SLURM, Open MPI and TPU pods it finds everything
    itself; elsewhere (e.g. plain processes on one or more machines) pass all
    three, the coordinator either here or as ``JAX_COORDINATOR_ADDRESS``.
    Call it before anything touches a device.

    Args:
      coordinator: ``"host:port"`` of process 0, reachable from every process.
      num_processes: how many processes the run has.
      process_id: this process's index, ``0 <= process_id < num_processes``.

    Returns:
      Whether JAX's distributed runtime is initialized (here or before).
    """
    if jax.distributed.is_initialized():
        return True
    given = {
        name: value
        for name, value in (
            ("coordinator_address", coordinator),
            ("num_processes", num_processes),
            ("process_id", process_id),
        )
        if value is not None
    }
    if not given and not _env_wants_distributed():
        return False
    jax.distributed.initialize(**{"coordinator_address": coordinator, **given})
    return True


def is_main_process() -> bool:
    """Whether this is process 0, the one that logs and writes files."""
    return jax.process_index() == 0
