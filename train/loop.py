"""The fine-tuning loop shared by ``train.text``, ``train.image`` and ``train.lm``.

A method (every adapter method of the registry: ``cdvft`` and the baselines; or ``head``, ``full``) decides which
parameters train and with which optimizer; :func:`train_and_evaluate` runs the paper's protocol on top of
the library: AdamW with a linear schedule and 6% warm-up, dev evaluation before training and after every
epoch, the best epoch reported.  Data comes in as :class:`Batch` iterators, so the loop knows nothing about
text or images; what is minimised and evaluated is an :class:`~train.methods.Objective` (classification by
default; a causal language model's masked next-token loss and generations for ``train.lm``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import jax
import numpy as np
import optax
from jax.sharding import Mesh

import cdvft_jax
from cdvft_jax import sharding
from cdvft_jax.checkpoint import TrainingCheckpointer
from cdvft_jax.config import ALL_LINEAR
from train.cli import ConfigError, check_count, check_number, check_rate, flag, parse
from train.hooks import (
    CheckpointHook,
    Hook,
    MetricsLogHook,
    ProgressHook,
    StepEvent,
    TensorBoardHook,
    tensorboard_available,
)
from train.methods import (
    ADAPTER_METHODS,
    HEAD_LEARNING_RATE,
    METHOD_SIZES,
    METHODS,
    Batch,
    MethodSetup,
    Objective,
    build_method,
    classification_objective,
    default_learning_rate,
)
from train.runtime import make_runtime

Item = TypeVar("Item")


def size_helps() -> dict[str, str]:
    """``{size field: "method: what it sets (default ...); ..."}`` over the registered methods."""
    helps: dict[str, list[str]] = {}
    for name in ADAPTER_METHODS:
        spec = cdvft_jax.method_spec(name)
        for size in spec.sizes:
            default = spec.default(size.field)
            shown = "" if default is None else f" (default {default})"
            helps.setdefault(size.field, []).append(f"{name}: {size.help}{shown}")
    return {field: "; ".join(parts) for field, parts in helps.items()}


def _method_sizes_class() -> type:
    # One ``int | None`` field per size setting of the registered methods, documented from the registry,
    # so that a new method's size flag (``--block-size``, ``--rank``, ...) needs no line here.
    helps = size_helps()
    doc = "The registered methods' size settings (``None``: the method's default).\n\nAttributes:\n"
    doc += "".join(f"  {field}: {text}\n" for field, text in helps.items())
    fields = [(field, int | None, dataclasses.field(default=None)) for field in helps]
    sizes = dataclasses.make_dataclass("MethodSizes", fields, frozen=True, kw_only=True, namespace={"__doc__": doc})
    sizes.__module__ = __name__
    return sizes


MethodSizes = _method_sizes_class()
METHOD_SIZES_FIELDS = tuple(f.name for f in dataclasses.fields(MethodSizes))


@dataclasses.dataclass(frozen=True)
class TrainSettings(MethodSizes):
    """How to fine-tune, independent of the data (and each method's size, from :class:`MethodSizes`).

    Attributes:
      method: one of the adapter methods of the registry (cdvft, lora, ...), head (the classifier
        only) or full.
      epochs: passes over the training data.
      learning_rate: peak rate of the adapter vectors (of every weight for full; unused by head);
        None is the method's default (AdapterMethod.learning_rate; full 2e-5).
      head_learning_rate: peak rate of the classifier head (adapter methods and head).
      alpha: the adapter's scale (None: the method's default; LoRA scales by alpha / rank).
      weight_decay: AdamW decoupled weight decay.
      warmup_ratio: share of the steps with a linear warm-up.
      max_steps: stop after this many optimizer steps.
      seed: seeds the head, the adapter, dropout and shuffling.
      target_modules: the layers the adapter method adapts; None is the method's default
        (:attr:`cdvft_jax.methods.MethodSpec.target_modules`: all-linear for CDVFT, query and value for the
        other methods).
      head_modules: the modules trained in full (the task head).
    """

    method: str = "cdvft"
    epochs: int = 3
    learning_rate: float | None = None
    head_learning_rate: float = HEAD_LEARNING_RATE
    alpha: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = cdvft_jax.WARMUP_RATIO
    max_steps: int | None = None
    seed: int = 0
    target_modules: tuple[str, ...] | None = None
    head_modules: tuple[str, ...] = ("classifier",)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        check_count(self.epochs, "epochs")
        for name in (*METHOD_SIZES_FIELDS, "max_steps"):
            check_count(getattr(self, name), name, optional=True)
        check_rate(self.learning_rate, "learning_rate", optional=True)
        check_rate(self.head_learning_rate, "head_learning_rate")
        if self.alpha is not None:
            check_number(self.alpha, "alpha")
        check_number(self.weight_decay, "weight_decay", low=0.0)
        check_number(self.warmup_ratio, "warmup_ratio", low=0.0, below=1.0)
        check_count(self.seed, "seed", low=0)
        if self.method in METHOD_SIZES:
            every_size = {size for sizes in METHOD_SIZES.values() for size in sizes}
            stray = sorted(f for f in every_size - set(METHOD_SIZES[self.method]) if getattr(self, f) is not None)
            if stray:
                raise ConfigError(f"{', '.join(map(flag, stray))} does not apply to --method {self.method}")

    @classmethod
    def from_config(cls, config: Any) -> TrainSettings:
        """The settings named like attributes of a program's config; the others keep their defaults."""
        names = [f.name for f in dataclasses.fields(cls) if hasattr(config, f.name)]
        return cls(**{name: getattr(config, name) for name in names})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig(TrainSettings):
    """:class:`TrainSettings` plus what both programs share: batch size, data subsets and the run flags.

    Attributes:
      batch_size: examples per optimizer step (the global batch on a mesh).
      max_train_samples: train on a fixed random subset of this size.
      max_eval_samples: evaluate on a fixed random subset of this size.
      output_dir: where ``metrics.jsonl``, ``results.json``, the adapter and checkpoints go.
      checkpoint_every: save the trainable state every N steps (and at the end).
      resume: continue from the latest checkpoint in the output folder (its settings must be the same).
      overwrite: replace the run already in the output folder (without it, a fresh run refuses one).
      mesh: the device mesh, e.g. data=2,fsdp=4 (None: one device, or every device on data).
      coordinator: process 0's host:port in a multi-process run (SLURM, Open MPI and TPU pod slices are
        detected; elsewhere give it with num_processes and process_id, or set JAX_COORDINATOR_ADDRESS).
      num_processes: how many processes the run has.
      process_id: this process's index.
    """

    batch_size: int = 32
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    output_dir: Path = Path("outputs")
    checkpoint_every: int | None = None
    resume: bool = False
    overwrite: bool = False
    mesh: str | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.batch_size, "batch_size")
        for name in ("max_train_samples", "max_eval_samples", "checkpoint_every", "num_processes"):
            check_count(getattr(self, name), name, optional=True)
        check_count(self.process_id, "process_id", low=0, optional=True)
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --output-dir and --overwrite replaces it: give one")


# What a run leaves in its output folder; a fresh run refuses a folder that holds any of them.
RUN_FILES = (
    *("run.json", "metrics.jsonl", "results.json", "checkpoints", "adapter", "tensorboard"),
    *("generations", "merged"),  # train.lm's generations per evaluation and merged export
)
# Config fields that do not change what a run computes: where it writes, how it restarts, on which devices
# (restoring onto another mesh is a feature); and the paths of the data, which may move: the data itself
# is fingerprinted by content.
RUN_ONLY_FIELDS = frozenset(
    {"output_dir", "resume", "overwrite", "checkpoint_every", "mesh", "coordinator", "num_processes", "process_id"}
    | {"data_dir", "train_file", "eval_file", "image_dir", "eval_dir"}
)


def fixed_subset(items: Sequence[Item], limit: int | None, seed: int) -> list[Item]:
    """A fixed random subset of ``limit`` of ``items`` (all when ``limit`` is ``None`` or not smaller), in
    their order; the same ``seed`` picks the same subset.

    >>> fixed_subset("abcdef", 3, seed=0) == fixed_subset("abcdef", 3, seed=0)
    True
    >>> fixed_subset("abc", None, seed=0)
    ['a', 'b', 'c']
    """
    if limit is None or limit >= len(items):
        return list(items)
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:limit])
    return [items[i] for i in keep]


def digest(*parts: Any) -> str:
    """SHA-256 (hex) of arrays, strings and JSON-able values, in order: a stable fingerprint of data."""
    sha = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            sha.update(f"{part.dtype.str}{part.shape}".encode())
            sha.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, bytes):
            sha.update(part)
        else:
            sha.update(json.dumps(part, sort_keys=True, default=str).encode())
        sha.update(b"\0")
    return sha.hexdigest()


# Weight files of a Hugging Face folder; other files (READMEs, locks, tokenizers) do not change the model.
_WEIGHT_SUFFIXES = (".safetensors", ".msgpack", ".bin", ".h5", ".pt", ".pth")
_EDGE_BYTES = 1 << 20


def model_digest(name_or_path: str) -> str:
    """A local model folder's fingerprint: ``config.json``, and each weight file's name, size and first and
    last MiB (so another checkpoint of the same shapes differs, without reading gigabytes on every start).

    A hub name is returned as it is: the hub's own revision is out of this library's sight.
    """
    root = Path(name_or_path)
    if not (root / "config.json").is_file():
        return name_or_path
    sha = hashlib.sha256((root / "config.json").read_bytes())
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)):
        size = path.stat().st_size
        sha.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            sha.update(f.read(_EDGE_BYTES))
            if size > 2 * _EDGE_BYTES:
                f.seek(size - _EDGE_BYTES)
                sha.update(f.read())
    return sha.hexdigest()


def run_fingerprint(config: Any, **facts: Any) -> dict[str, Any]:
    """What decides a run's trajectory: ``config``'s fields but :data:`RUN_ONLY_FIELDS`, plus ``facts``.

    ``facts`` are what the fields do not pin down, e.g. ``model=model_digest(path)`` and digests of the
    data actually read.  The result is JSON-normal (paths as strings, tuples as lists), as ``run.json``
    stores it.
    """
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUN_ONLY_FIELDS}
    return json.loads(json.dumps({**fields, **facts}, sort_keys=True, default=str))


def parse_config(config_class: type, argv: Sequence[str] | None, *, prog: str, description: str, **defaults: Any):
    """The command line ``argv`` as a ``config_class`` (:func:`train.cli.parse`), whose defaults are the
    fields' or those given here (a task's preset); ``--learning-rate`` left unset is the method's default.

    Raises:
      SystemExit: with status 2 and a message naming the flag, for a value out of its range (or tyro's own
        message for an unknown flag or a value of the wrong type).
    """
    config = parse(config_class, argv, prog=prog, description=description, default=config_class(**defaults))
    if config.learning_rate is None:
        config = dataclasses.replace(config, learning_rate=default_learning_rate(config.method))
    return config


def prepare_output(
    output_dir: Path, *, resume: bool, overwrite: bool = False, fingerprint: dict[str, Any] | None = None
) -> Path:
    """Readies ``output_dir`` for a run and returns its ``metrics.jsonl``.

    A fresh run (``resume=False``) refuses a folder that holds a run with progress (a checkpoint, an
    adapter, results, or an evaluation after training began), so two runs never mix, unless
    ``overwrite`` is set, which deletes that run's files (:data:`RUN_FILES`) first.  ``--resume`` into
    such a folder compares ``fingerprint`` with the ``run.json`` stored there and refuses any difference,
    naming the fields.  A folder with no progress (empty, or a run that stopped before its first
    checkpoint) is started afresh either way.  A new run stores ``fingerprint`` as ``run.json``.

    Process 0 decides and writes, and every process follows its decision; with several processes
    their fingerprints must agree (e.g. every host reads the same data and model).  It asks JAX for
    the process index, so a multi-process run calls :func:`mesh_from_flag` first.

    Raises:
      SystemExit: the folder holds another run, or one with other settings, or the processes disagree.
    """
    if fingerprint is not None and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        local = np.frombuffer(bytes.fromhex(digest(fingerprint)), np.uint8)
        if not np.array_equal(multihost_utils.broadcast_one_to_all(local), local):
            raise SystemExit(
                f"process {jax.process_index()} computed other run settings than process 0 (another model "
                "folder, other data or flags on this host?); every process must run the same job"
            )
    problem = _output_problem(output_dir, resume=resume, overwrite=overwrite, fingerprint=fingerprint)
    if jax.process_count() > 1:  # process 0's verdict, so that every process stops or none does
        from jax.experimental import multihost_utils

        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(problem is not None)))
        problem = (problem or f"process 0 refused --output-dir {output_dir} (its log says why)") if refused else None
    if problem is not None:
        raise SystemExit(problem)
    if sharding.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and _has_progress(output_dir)):
            for name in RUN_FILES:
                path = output_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            if fingerprint is not None:
                _write_atomically(output_dir / "run.json", json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    _barrier("prepare_output written")
    return output_dir / "metrics.jsonl"


def _has_progress(output_dir: Path) -> bool:
    """Whether the run in ``output_dir`` got anywhere: a checkpoint step, an adapter, results, or a logged
    evaluation after training began (a log of the step-0 evaluation alone is redone by any new run)."""
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir() and any(p.name.isdigit() for method in checkpoints.iterdir() for p in _entries(method)):
        return True
    if (output_dir / "adapter").exists() or (output_dir / "results.json").exists():
        return True
    log = output_dir / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) > 0:
                    return True
            except (json.JSONDecodeError, AttributeError):
                return True  # a damaged log is not ours to judge empty
    return False


def _entries(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


def _output_problem(
    output_dir: Path, *, resume: bool, overwrite: bool, fingerprint: dict[str, Any] | None
) -> str | None:
    if not _has_progress(output_dir):
        return None
    present = [name for name in RUN_FILES if (output_dir / name).exists()]
    if not resume:
        if overwrite:
            return None
        return (
            f"{output_dir} already holds a run ({', '.join(present)}): pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output-dir"
        )
    record = output_dir / "run.json"
    if not record.exists():
        return (
            f"--resume: {output_dir} holds {', '.join(present)} but no run.json, so its settings cannot be "
            "checked (a run of an older version?); start afresh with --overwrite"
        )
    try:
        stored = json.loads(record.read_text())
    except json.JSONDecodeError as e:
        return f"--resume: {record} is damaged ({e}); start afresh with --overwrite"
    return None if fingerprint is None else _difference(stored, fingerprint, output_dir)


def _difference(stored: dict[str, Any], fingerprint: dict[str, Any], output_dir: Path) -> str | None:
    fields = sorted(set(stored) | set(fingerprint))
    differ = [f for f in fields if stored.get(f, "<absent>") != fingerprint.get(f, "<absent>")]
    if not differ:
        return None
    lines = "\n".join(
        f"  {f}: {_short(stored.get(f, '<absent>'))} in the run, {_short(fingerprint.get(f, '<absent>'))} now"
        for f in differ
    )
    return (
        f"--resume: the run in {output_dir} was made with other settings; {len(differ)} differ:\n{lines}\n"
        "resume with the run's settings, or start afresh with --overwrite"
    )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    temporary.replace(path)


def mesh_from_flag(
    spec: str | None,
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Mesh | None:
    """The device mesh of ``--mesh`` (``"data=2,fsdp=4"``), after joining a multi-process job if one is set up.

    ``None`` (no flag) on a single device means no mesh; with several devices and no flag every device
    goes on the ``data`` axis.  ``coordinator``, ``num_processes`` and ``process_id`` (the flags of the
    same names) go to :func:`cdvft_jax.sharding.maybe_initialize_distributed`; call this before anything
    else touches JAX.
    """
    sharding.maybe_initialize_distributed(coordinator, num_processes, process_id)
    if spec is None and jax.device_count() == 1:
        return None
    return sharding.make_mesh(sharding.parse_mesh(spec))


def adapter_config(name: str, settings: TrainSettings) -> cdvft_jax.AdapterConfig:
    """The adapter config of method ``name`` (one of :data:`ADAPTER_METHODS`) from ``settings``.

    ``settings`` has already refused the sizes of other methods (e.g. ``--rank`` with ``cdvft``).  The
    target ``all-linear`` alone (``--target-modules all-linear``) is the library's :data:`~cdvft_jax.config.ALL_LINEAR`:
    every linear layer but the output head.

    Raises:
      SystemExit: if a value does not make a valid config.
    """
    targets = cdvft_jax.method_spec(name).target_modules if settings.target_modules is None else settings.target_modules
    fields = {f: getattr(settings, f) for f in METHOD_SIZES[name] if getattr(settings, f) is not None}
    if settings.alpha is not None:
        fields["alpha"] = settings.alpha
    config_class = cdvft_jax.method_spec(name).config_class
    try:
        return config_class(
            target_modules=ALL_LINEAR if [t.lower() for t in targets] == [ALL_LINEAR] else list(targets),
            modules_to_save=list(settings.head_modules),
            **fields,
        )
    except ValueError as e:
        raise SystemExit(f"--method {name}: {e}") from e


def setup_method(
    name: str, model: Any, settings: TrainSettings, total_steps: int, frozen_dtype: Any = None
) -> MethodSetup:
    """:func:`~train.methods.build_method` for method ``name`` with ``settings``' rates, schedule and sizes
    (``frozen_dtype``: the dtype the frozen base weights are stored in, ``None`` as loaded)."""
    peak = default_learning_rate(name) if settings.learning_rate is None else settings.learning_rate

    def scheduled(rate: float) -> optax.Schedule:
        return cdvft_jax.warmup_linear_decay(rate, total_steps, settings.warmup_ratio)

    return build_method(
        name,
        model,
        config=adapter_config(name, settings) if name in ADAPTER_METHODS else None,
        head_modules=settings.head_modules,
        learning_rate=scheduled(peak),
        head_learning_rate=scheduled(settings.head_learning_rate),
        weight_decay=settings.weight_decay,
        seed=settings.seed,
        frozen_dtype=frozen_dtype,
    )


class Generation(NamedTuple):
    """The generating part of an evaluation (the objective's ``generate`` on its own batches).

    Attributes:
      batches: ``batches()`` yields the batches to generate for (rows of weight 0 are dropped).
      metrics: ``metrics(outputs) -> {name: value}`` from what ``generate`` returned for those rows, in order.
    """

    batches: Callable[[], Iterator[Batch]]
    metrics: Callable[[Any], dict[str, float]]


class Evaluation(NamedTuple):
    """How to score a model on the dev set.

    Attributes:
      batches: ``batches()`` yields the dev batches (rows of weight 0 only fill the last one).
      labels: what ``metrics`` compares the predictions with.
      metrics: ``metrics(predictions, labels) -> {name: value}``; ``predictions`` is what the objective's
        ``predict`` returned for the rows of weight 1, in order (an array, or a dict of arrays).
      metric_names: the names logged and reported (``metrics`` and ``generation`` together).
      main_metric: the one that picks the best evaluation.
      generation: also generate and score that (``None``: no generation).
      greater_is_better: whether a higher ``main_metric`` is better (a loss is not).
    """

    batches: Callable[[], Iterator[Batch]]
    labels: np.ndarray
    metrics: Callable[[Any, np.ndarray], dict[str, float]]
    metric_names: Sequence[str]
    main_metric: str
    generation: Generation | None = None
    greater_is_better: bool = True


def _predictions(step: Callable[..., Any], trainable: Any, frozen: Any, batches: Iterator[Batch]) -> Any:
    """``step``'s outputs for the rows of weight 1 of every batch, concatenated (an array or a dict of them)."""
    outputs = []
    for batch in batches:
        keep = np.asarray(batch.weights) > 0
        outputs.append(jax.tree.map(lambda out, keep=keep: np.asarray(out)[keep], step(trainable, frozen, batch)))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def evaluate(eval_step, trainable, frozen, evaluation: Evaluation, generate_step=None) -> dict[str, float]:
    """The dev metrics of the model ``(trainable, frozen)``; with ``evaluation.generation``, those of
    ``generate_step``'s outputs too.

    Raises:
      ValueError: the evaluation generates but no ``generate_step`` is given.
    """
    result = evaluation.metrics(_predictions(eval_step, trainable, frozen, evaluation.batches()), evaluation.labels)
    if evaluation.generation is not None:
        if generate_step is None:
            raise ValueError("the evaluation generates, but the run's objective has no generate function")
        outputs = _predictions(generate_step, trainable, frozen, evaluation.generation.batches())
        result = {**result, **evaluation.generation.metrics(outputs)}
    return result


class NonFiniteTraining(SystemExit):
    """A step's loss or updated trainable weights were NaN or infinite; the run stops at that step."""


class RunningLoss:
    """Sum and count of an epoch's step losses, read from the device only when asked for.

    Converting each step's loss to a Python float would make the host wait for every step
    before it prepares the next batch; the losses (and each step's ``finite`` flag) are kept as
    device scalars until the progress bar, a checkpoint or the epoch's end needs them.  Reading
    them stops the run at the first non-finite step, before anything of it is saved.
    """

    def __init__(self, total: float = 0.0, count: int = 0) -> None:
        self.total, self.count = total, count
        self._pending: list[tuple[int, jax.Array, jax.Array]] = []

    def add(self, step: int, loss: jax.Array, finite: jax.Array) -> None:
        """Records optimizer step ``step``'s loss and ``finite`` flag without waiting for them."""
        self._pending.append((step, loss, finite))

    def settle(self) -> tuple[float, int]:
        """``(sum, count)`` so far; waits for the pending steps.

        Raises:
          NonFiniteTraining: naming the first pending step whose loss or weights are not finite.
        """
        for step, loss, finite in self._pending:  # in step order, so a resumed run sums exactly as a straight one
            if not bool(finite):
                raise NonFiniteTraining(
                    f"step {step}: the loss ({float(loss)}) or the updated weights are NaN or infinite; "
                    "the run stops here and nothing of this step or later is saved (the checkpoints before "
                    "it stay). Start again at a lower learning rate with --overwrite (which replaces this run) "
                    "or another --output-dir, or look for bad inputs or labels."
                )
            self.total += float(loss)
            self.count += 1
        self._pending.clear()
        return self.total, self.count

    def mean(self) -> float | None:
        """The mean loss so far, ``None`` before the first step."""
        total, count = self.settle()
        return total / count if count else None

    def position(self, epoch: int, batch: int) -> dict[str, Any]:
        """The resumable data position after ``batch`` batches of ``epoch``, with the running loss."""
        total, count = self.settle()
        return {"epoch": epoch, "batch": batch, "loss_sum": total, "loss_count": count}


class TrainData(NamedTuple):
    """What a run trains and is scored on.

    Attributes:
      steps_per_epoch: full batches per epoch.
      batches: ``batches(epoch)`` yields that epoch's training batches; it must depend only on the epoch
        (and fixed seeds), so that a run is reproducible and a resumed one sees the same batches.
      evaluation: the dev set and its metrics.
      regression: one output, squared-error loss (for the default objective).
      objective: what is minimised and what the evaluation reads (``None``: a classifier's, or a regressor's
        with ``regression``; :func:`~train.methods.causal_lm_objective` for language models).
    """

    steps_per_epoch: int
    batches: Callable[[int], Iterator[Batch]]
    evaluation: Evaluation
    regression: bool
    objective: Objective | None = None


class RunFiles(NamedTuple):
    """Where a run writes, and whether it continues what is there.

    Attributes:
      log_path: ``metrics.jsonl``; one JSON object per evaluation is appended.
      adapter_dir: where to save the trained adapter (``save_adapter``'s folder), for adapter methods.
      checkpoint_dir: where to keep Orbax checkpoints of the trainable state (``None``: none).
      checkpoint_every: save every this many steps (and always after the last one).
      resume: continue from the latest checkpoint in ``checkpoint_dir``, keeping the evaluations already
        in ``log_path``; a resumed run ends bitwise identical to an uninterrupted one on CPU.
      tensorboard_dir: also write TensorBoard events there (:class:`~train.hooks.TensorBoardHook`; the
        programs pass :func:`tensorboard_folder`, ``None`` when ``tensorboardX`` is not installed).
    """

    log_path: Path
    adapter_dir: Path | None = None
    checkpoint_dir: Path | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    tensorboard_dir: Path | None = None


def train_and_evaluate(
    model: Any,
    settings: TrainSettings,
    data: TrainData,
    files: RunFiles,
    *,
    method: str | None = None,
    description: str = "",
    base_model: str | None = None,
    mesh: Mesh | None = None,
    extra_hooks: Sequence[Hook] = (),
    frozen_dtype: Any = None,
) -> dict:
    """Trains ``method`` on ``model`` with evaluation before training and after every epoch.

    The run is a runtime (:func:`~train.runtime.make_runtime`: placed state and the train and eval steps)
    driven through the epochs, with hooks that checkpoint, log, show progress and write TensorBoard events.

    Args:
      model: a Hugging Face Flax model with its pretrained params.
      settings: the method's hyper-parameters.
      data: the training batches and the dev evaluation.
      files: the metrics log, adapter, checkpoint and TensorBoard folders, and whether to resume.
      method: one of :data:`METHODS` (``None``: ``settings.method``).
      description: the progress bar's label.
      base_model: the base model's name or path, recorded in the adapter file.
      mesh: shard the run over this device mesh (``cdvft_jax.sharding``): the frozen base FSDP-sharded
        along ``fsdp``, the batch split over ``data`` x ``fsdp``, the trainable state replicated.
        ``None`` runs on one device.  With several processes every process iterates the same global
        batches and copies only its own rows (``sharding.local_rows``) to its devices; predictions
        come back replicated, so every process computes the same metrics (:func:`~train.runtime.make_runtime`).
      extra_hooks: more :class:`~train.hooks.Hook`\\ s, called after the built-in ones (checkpoints, the
        metrics log, progress, TensorBoard).
      frozen_dtype: store the frozen base weights in this dtype (e.g. ``jnp.bfloat16``); trainable leaves
        stay float32 (:func:`~train.methods.build_method`).

    Returns:
      The run's summary: trainable params, the dev metrics ``before`` training, at the ``best`` epoch
      (``best_epoch``) and at the ``final`` step, ``final_train_loss`` (the mean loss of the last epoch's
      steps), every logged evaluation (``evaluations``), steps and timing.
    """
    method = method or settings.method
    if data.steps_per_epoch == 0:
        raise SystemExit("the training set is smaller than one batch")
    total_steps = data.steps_per_epoch * settings.epochs
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    setup = setup_method(method, model, settings, total_steps, frozen_dtype)
    print(f"[{method}] {setup.describe}", flush=True)
    objective = data.objective or classification_objective(data.regression)
    runtime = make_runtime(setup, objective=objective, seed=settings.seed, mesh=mesh)
    state, dropout_key = runtime.state, runtime.dropout_key
    evaluation = data.evaluation

    resume_from = {"epoch": 1, "batch": 0, "loss_sum": 0.0, "loss_count": 0}
    hooks: list[Hook] = []
    if files.checkpoint_dir is not None:
        checkpointer = TrainingCheckpointer(files.checkpoint_dir, save_every=files.checkpoint_every or total_steps)
        hooks.append(CheckpointHook(checkpointer))
    try:  # from here on an error stops every hook built so far (the checkpointer's threads first)
        restored = None
        if files.resume and files.checkpoint_dir is not None:
            restored = checkpointer.restore_latest(state, dropout_key)
        if restored is not None:
            state, dropout_key, resume_from = restored
            print(f"[{method}] resumed from step {int(state.step)} in {files.checkpoint_dir}", flush=True)
        step = int(state.step)
        # Evaluations logged before a restart are kept; later ones are redone (they are deterministic).
        records = _logged_records(files.log_path, method, step) if files.resume else []
        hooks += [MetricsLogHook(files.log_path), ProgressHook(description, method, total_steps)]
        if files.tensorboard_dir is not None:
            # A resumed run hides what the cut-short one logged after the restored step (and redoes it).
            resumed_from = step if files.resume else None
            hooks.append(TensorBoardHook(files.tensorboard_dir, evaluation.metric_names, resumed_from=resumed_from))
        hooks += extra_hooks
        if not records:
            before = evaluate(runtime.eval_step, state.trainable, runtime.frozen, evaluation, runtime.generate_step)
            records = [{"method": method, "step": 0, "epoch": 0, "train_loss": None, **before}]
            _notify(hooks, "on_evaluation", records[-1])
        for hook in hooks:
            hook.on_start(step)
        first_step, start = step, time.perf_counter()
        state, step = _fit(runtime, state, dropout_key, data, hooks, records, resume_from, total_steps, method)
    except BaseException:
        _abort(hooks)
        raise
    seconds = time.perf_counter() - start
    cdvft_jax.check_finite(state.trainable, "the trained state")  # settled above; a last guard before saving
    if files.adapter_dir is not None and setup.adapted is not None and sharding.is_main_process():
        cdvft_jax.save_adapter(files.adapter_dir, setup.adapted, state.trainable, base_model=base_model)
    best = max(records[1:], key=lambda r: _score(r, evaluation.main_metric, evaluation.greater_is_better))
    return {
        "method": method,
        "trainable_params": cdvft_jax.count_params(state.trainable),
        "before": {m: records[0][m] for m in evaluation.metric_names},
        "best": {m: best[m] for m in evaluation.metric_names},
        "best_epoch": best["epoch"],
        "final": {m: records[-1][m] for m in evaluation.metric_names},
        "final_train_loss": records[-1]["train_loss"],
        "evaluations": records,
        "train_seconds": seconds,
        "steps": step,
        "steps_per_second": (step - first_step) / seconds if seconds > 0 else None,
    }


def _fit(
    runtime: Any,
    state: Any,
    dropout_key: jax.Array,
    data: TrainData,
    hooks: Sequence[Hook],
    records: list[dict],
    resume_from: dict[str, Any],
    total_steps: int,
    method: str,
) -> tuple[Any, int]:
    """The epochs from ``resume_from`` to ``total_steps``: steps, the hooks' calls and an evaluation after
    each epoch (appended to ``records``, unless logged before a restart); returns the state and step."""
    step = int(state.step)
    position: dict[str, Any] | Callable[[], dict[str, Any]] = resume_from  # where the last step left the data
    losses = RunningLoss(resume_from["loss_sum"], resume_from["loss_count"])
    examples = 0
    for epoch in range(resume_from["epoch"], math.ceil(total_steps / data.steps_per_epoch) + 1):
        resumed_here = epoch == resume_from["epoch"]
        skip = resume_from["batch"] if resumed_here else 0
        if not resumed_here:
            losses = RunningLoss()
        for index, batch in enumerate(data.batches(epoch)):
            if index < skip:
                continue  # consumed before the restart; iterating keeps any augmentation RNG in step
            if step == total_steps:
                break
            state, metrics = runtime.train_step(state, runtime.frozen, batch, jax.random.fold_in(dropout_key, step))
            step += 1
            losses.add(step, metrics["loss"], metrics["finite"])
            position = functools.partial(losses.position, epoch, index + 1)
            examples = len(batch.labels)
            _notify(hooks, "on_step", StepEvent(step, total_steps, state, dropout_key, losses, position, examples))
        if any(r["epoch"] == epoch for r in records):
            continue  # evaluated before the restart
        train_loss = losses.mean()  # first: it stops a non-finite run before an evaluation is logged
        result = evaluate(runtime.eval_step, state.trainable, runtime.frozen, data.evaluation, runtime.generate_step)
        records.append({"method": method, "step": step, "epoch": epoch, "train_loss": train_loss, **result})
        _notify(hooks, "on_evaluation", records[-1])
    _notify(hooks, "on_finish", StepEvent(step, total_steps, state, dropout_key, losses, position, examples))
    return state, step


def tensorboard_folder(output_dir: Path) -> Path | None:
    """``output_dir / "tensorboard"`` when ``tensorboardX`` is installed; else ``None``, said once."""
    if tensorboard_available():
        return output_dir / "tensorboard"
    print("no TensorBoard events: tensorboardX is not installed (metrics.jsonl has every evaluation)", flush=True)
    return None


def _abort(hooks: Sequence[Hook]) -> None:
    """``on_abort`` of every hook; one that fails is reported and the next is still stopped, and the error
    that stopped the run stays the one raised."""
    for hook in hooks:
        try:
            hook.on_abort()
        except Exception as e:
            print(f"{type(hook).__name__} failed while stopping: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def _notify(hooks: Sequence[Hook], event: str, argument: Any) -> None:
    for hook in hooks:
        getattr(hook, event)(argument)


def _score(record: dict, metric: str, greater_is_better: bool = True) -> float:
    value = record[metric]
    if value is None or math.isnan(value):
        return -math.inf
    return value if greater_is_better else -value


def _logged_records(path: Path, method: str, step: int) -> list[dict]:
    """``method``'s evaluations in ``path`` up to ``step``; the file is rewritten without the later ones.

    A final line cut short by a kill mid-write is dropped with a message (its evaluation is redone);
    a damaged line before the last is an error naming it.
    """
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise SystemExit(f"{path}:{number}: not a JSON record ({e}); the log is damaged") from e
            print(f"{path}:{number}: dropping a torn last line (a write was cut short); it is redone", flush=True)
    kept = [r for r in records if r["method"] != method or r["step"] <= step]
    if sharding.is_main_process():  # atomically: other processes may be reading the file
        _write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
    return [r for r in kept if r["method"] == method]


def write_results(
    output_dir: Path, *, task: str, model: str, settings: TrainSettings, config: dict, runs: list[dict]
) -> dict:
    """Writes ``results.json`` (the first run is the main one) and returns its content."""
    main = runs[0]
    results = {
        "task": task,
        "model": model,
        "method": main["method"],
        "seed": settings.seed,
        "trainable_params": main["trainable_params"],
        "best": main["best"],
        "best_epoch": main["best_epoch"],
        "before": main["before"],
        "train_seconds": main["train_seconds"],
        "steps_per_second": main["steps_per_second"],
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in config.items()},
        "runs": runs,
    }
    if sharding.is_main_process():
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def summary_table(task: str, main_metric: str, runs: list[dict]) -> str:
    """A markdown table of each run's main dev metric before and after training."""
    rows = [
        f"\ndev {main_metric} on {task}:",
        "| method | trainable params | before | after (best epoch) | train s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        rows.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['before'][main_metric]:.4f} | "
            f"{r['best'][main_metric]:.4f} ({r['best_epoch']}) | {r['train_seconds']:.0f} |"
        )
    return "\n".join(rows)
