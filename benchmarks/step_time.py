"""Wall-clock time and peak memory of one jitted train step, CDVFT against its baselines.

What is measured
----------------
One full training step -- forward, backward, AdamW update, all inside the one
``jit`` that :func:`cdvft_jax.make_train_step` builds -- of a randomly
initialised model (``--model``):

* ``roberta-base``: ``FlaxRobertaForSequenceClassification`` of RoBERTa-base's
  shape (hidden 768, 12 layers, 12 heads, intermediate 3072, vocab 50265,
  2 labels) on a fixed random batch of 16 x 128 tokens by default;
* ``vit-base``: ``FlaxViTForImageClassification`` of ViT-base's shape (hidden
  768, 12 layers, 12 heads, intermediate 3072, 224 px images, patch 16, so
  196 patches + [CLS] = 197 tokens an image, 10 labels) on 16 random images.

The loss is softmax cross-entropy.  Dropout is off (``train=False``), so every
method runs the same forward pass and differs only in which parameters are
trainable:

* ``full``: every parameter trainable (the frozen tree is empty);
* ``head``: only ``classifier/...`` trainable; the backward pass stops at the head;
* ``floor``: ``classifier/...`` plus the earliest cheap leaf of the network
  (:data:`benchmarks.common.FLOOR_LEAVES`): ``roberta/embeddings/LayerNorm/...`` for RoBERTa and
  ``vit/embeddings/position_embeddings`` for ViT (its embeddings have no
  LayerNorm; the position embeddings are added to the patch and [CLS]
  embeddings right before the first encoder layer, so their gradient is the
  batch sum of the gradient at the encoder's input -- the same work as the
  RoBERTa LayerNorm's scale and bias).  The gradient has to travel back
  through every encoder layer to reach that leaf, but no weight gradient of
  any encoder layer is computed;
* adapters (:data:`benchmarks.common.ADAPTER_METHODS`: every registered
  method, ``cdvft`` and the baselines) on ``query`` and ``value`` of every
  layer plus the classifier, via :func:`cdvft_jax.inject` and
  :func:`cdvft_jax.adapter_optimizer`, with the configs of
  :func:`benchmarks.common.adapter_config` (the papers' settings).

Why the floor matters
---------------------
Any adapter placed in every layer needs the activation gradient of every
layer, so no such method can be cheaper than ``floor``: it is the backward
pass with the weight gradients taken out.  ``ratio to floor`` therefore shows
what an adapter really costs on top of the unavoidable, and ``full`` shows
what adapting saves; ``head`` (no backward through the encoder) is a lower
bound no per-layer method can reach.

Protocol
--------
All methods share one model (built once with ``_do_init=True``) and one batch.
Each method is compiled ahead of time (``lower(...).compile()``, whose
``cost_analysis()`` gives the step's XLA flop count for free), then run for one
step and two warm-up steps.  Then ``--repeats``
rounds follow; each round runs one step of every method, in an order rotated
by one each round, so slow drifts of the machine (frequency, other load) fall
on every method alike.  A step is timed with ``time.perf_counter`` around the
call and ``jax.block_until_ready`` on its outputs; each method's train state
is threaded through its own steps (the step donates its state).  The table
gives the median, min and max milliseconds per step.

Peak RSS (``ru_maxrss``, in MiB) is measured per method in a fresh subprocess
(``python -m benchmarks.step_time --rss-only METHOD``) that builds the model,
compiles and runs three steps (``--rss-steps``) of that method alone; it includes the base
model's weights and the compiler's own memory, which every method pays alike.

Running it
----------
From the repository root::

    python -m benchmarks.step_time                      # full size, many minutes on few cores
    python -m benchmarks.step_time --small --repeats 3  # tiny model, a smoke run in seconds
    python -m benchmarks.step_time --methods floor,cdvft --no-rss --json out.json
    python -m benchmarks.step_time --model vit-base --methods floor,cdvft,lora --layers 2

``python -m benchmarks`` runs this for both models and every method, plus the
parameter, flop and operator benchmarks (:mod:`benchmarks.__main__`).

Progress goes to stderr, the markdown table to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

import cdvft_jax
from benchmarks.common import (
    BASELINE_METHODS,
    METHODS,
    MODELS,
    REPO_ROOT,
    SEED,
    build_model,
    host_info,
    log,
    make_inputs,
    method_parts,
    model_config,
    tokens_per_example,
    xla_flops,
)
from cdvft_jax import TrainState
from cdvft_jax.params import Params
from train.cli import Names, check_count, check_names, parse
from train.methods import Batch

WARMUP_STEPS = 2
RSS_STEPS = 3
# Linux keeps ru_maxrss across exec: a child forked straight from this process (hundreds of MB
# after importing jax and building the model) would report at least this process's RSS at the
# fork.  A bare Python in between forks the measured child, so its peak is its own.
RSS_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


@dataclasses.dataclass
class MethodRun:
    """One method's step (compiled ahead of time by :meth:`compile`) and the state threaded through its steps."""

    name: str
    step: Callable[[TrainState, Params, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]
    state: TrainState
    frozen: Params
    trainable_params: int
    times_s: list[float] = dataclasses.field(default_factory=list)
    flops: float | None = None

    def compile(self, batch: Batch, rng: jax.Array) -> float:
        """Replaces ``step`` by its compiled executable, records its XLA flops; returns the seconds it took."""
        start = time.perf_counter()
        compiled = self.step.lower(self.state, self.frozen, batch, rng).compile()
        self.flops = xla_flops(compiled)
        self.step = compiled
        return time.perf_counter() - start

    def run_step(self, batch: Batch, rng: jax.Array) -> float:
        """Runs one step, keeps its new state and returns its wall time in seconds."""
        start = time.perf_counter()
        state, metrics = self.step(self.state, self.frozen, batch, rng)
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - start
        self.state = state  # the old state was donated to the step
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(f"{self.name}: loss is {loss} at step {int(state.step)}")
        return elapsed


def setup_method(name: str, model: Any, kind: str = "roberta-base") -> MethodRun:
    """The :class:`MethodRun` of ``name``: its step, initial state and frozen tree."""
    parts = method_parts(name, model, kind)
    return MethodRun(
        name=name,
        step=cdvft_jax.make_train_step(parts.loss_fn, parts.optimizer),
        state=cdvft_jax.init_train_state(parts.trainable, parts.optimizer),
        frozen=parts.frozen,
        trainable_params=cdvft_jax.count_params(parts.trainable),
    )


def time_methods(runs: Sequence[MethodRun], batch: Batch, repeats: int, warmup: int = WARMUP_STEPS) -> None:
    """Compiles and warms up every method, then runs ``repeats`` interleaved rounds into ``times_s``."""
    rng = jax.random.key(SEED)
    for run in runs:
        log(f"compiling {run.name} ({run.trainable_params:,} trainable params)")
        seconds = run.compile(batch, rng)
        first = run.run_step(batch, rng)
        log(f"  compiled in {seconds:.1f} s, first step {first:.1f} s")
        for _ in range(warmup):
            run.run_step(batch, rng)
    for r in range(repeats):
        shift = r % len(runs)
        order = [*runs[shift:], *runs[:shift]]
        for run in order:
            run.times_s.append(run.run_step(batch, rng))
        log(f"round {r + 1}/{repeats}: " + ", ".join(f"{x.name} {1e3 * x.times_s[-1]:.1f} ms" for x in order))


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def rss_only(method: str, args: StepConfig) -> None:
    """Child mode: build, compile and run ``--rss-steps`` steps of one method; print the peak RSS."""
    model = build_model(args.small, args.model, args.layers)
    batch = make_inputs(model, args.model, args.batch, args.seq_len)
    run = setup_method(method, model, args.model)
    rng = jax.random.key(SEED)
    for _ in range(args.rss_steps):
        run.run_step(batch, rng)
    print(f"{peak_rss_mb():.1f}")


def peak_rss_in_subprocess(module: str, flags: Sequence[str]) -> float:
    """Runs ``python -m module *flags`` (a ``--rss-only`` child) in a fresh process; the MiB it prints."""
    command = [sys.executable, "-c", RSS_LAUNCHER, sys.executable, "-m", module, *flags]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(flags)} failed with exit code {done.returncode}:\n{done.stderr[-4000:]}")
    return float(lines[-1])


def measure_rss(method: str, args: StepConfig) -> float:
    """Peak RSS of ``method`` measured in a fresh subprocess."""
    flags = ["--rss-only", method, "--model", args.model, "--rss-steps", str(args.rss_steps)]
    flags += ["--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    if args.layers:
        flags += ["--layers", str(args.layers)]
    if args.small:
        flags.append("--small")
    log(f"peak RSS of {method} on {args.model} (subprocess)")
    return peak_rss_in_subprocess("benchmarks.step_time", flags)


def measure_all_rss(args: StepConfig) -> dict[str, float]:
    """Peak RSS of every method, ``--rss-jobs`` subprocesses at a time (a process's own peak does not
    depend on what runs beside it; only their wall time does)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=args.rss_jobs) as pool:
        return dict(zip(args.methods, pool.map(lambda name: measure_rss(name, args), args.methods), strict=True))


def model_label(args: StepConfig) -> str:
    """E.g. ``roberta-base-shaped``, ``vit-base-shaped (2 layers)`` or ``roberta-small-smoke``."""
    label = f"{args.model.split('-')[0]}-small-smoke" if args.small else f"{args.model}-shaped"
    return f"{label} ({args.layers} layers)" if args.layers else label


def machine_info(args: StepConfig) -> dict[str, Any]:
    """Where and how the benchmark ran."""
    config = model_config(args.small, args.model, args.layers)
    return {
        **host_info(),
        "model": model_label(args),
        "batch": args.batch,
        "seq_len": tokens_per_example(config, args.model, args.seq_len),
        "repeats": args.repeats,
    }


class Timing(NamedTuple):
    """A method's step times and XLA flops, kept after its buffers are freed."""

    name: str
    trainable_params: int
    times_s: list[float]
    flops: float | None = None


def summarize(runs: Sequence[Timing], rss: Mapping[str, float], tokens: int | None = None) -> list[dict[str, Any]]:
    """One result dict per method; ``ratio_to_floor`` is ``None`` when ``floor`` was not run."""
    medians = {run.name: 1e3 * statistics.median(run.times_s) for run in runs}
    floor = medians.get("floor")
    return [
        {
            "method": run.name,
            "trainable_params": run.trainable_params,
            "ms_per_step": medians[run.name],
            "ms_min": 1e3 * min(run.times_s),
            "ms_max": 1e3 * max(run.times_s),
            "peak_rss_mb": rss.get(run.name),
            "ratio_to_floor": None if floor is None else medians[run.name] / floor,
            "tokens_per_s": None if tokens is None else tokens / (1e-3 * medians[run.name]),
            "repeats": len(run.times_s),
            "xla_flops": run.flops,
        }
        for run in runs
    ]


def markdown(results: Sequence[Mapping[str, Any]], machine: Mapping[str, Any]) -> str:
    """The header line and the results table."""

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = (
        f"{machine['model']}, batch {machine['batch']} x {machine['seq_len']}, "
        f"{machine['repeats']} interleaved repeats | {machine['cpu']}, {machine['cores']} cores, "
        f"jax {machine['jax']} ({machine['backend']}: {machine['device_kind']}) | {machine['date']}"
    )
    rows = [
        header,
        "",
        "| method | trainable params | ms/step median | min | max | tokens/s | peak RSS MB | ratio to floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['ms_per_step']:.1f} | {r['ms_min']:.1f} "
            f"| {r['ms_max']:.1f} | {fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r['peak_rss_mb'], '.0f')} "
            f"| {fmt(r['ratio_to_floor'], '.2f')} |"
        )
    return "\n".join(rows)


def run_benchmark(args: StepConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Times ``args.methods`` on ``args.model`` (interleaved), then their peak RSS; ``(machine, results)``."""
    machine = machine_info(args)
    log(f"building the {machine['model']} model")
    model = build_model(args.small, args.model, args.layers)
    batch = make_inputs(model, args.model, args.batch, args.seq_len)
    runs = [setup_method(name, model, args.model) for name in args.methods]
    time_methods(runs, batch, args.repeats, args.warmup)
    timings = [Timing(run.name, run.trainable_params, run.times_s, run.flops) for run in runs]
    del runs, model, batch  # free this process's buffers before the RSS subprocesses build their own
    rss = measure_all_rss(args) if args.rss else {}
    return machine, summarize(timings, rss, machine["batch"] * machine["seq_len"])


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Train-step time and peak RSS of full, head, floor and adapter fine-tuning.

    Attributes:
      model: the model's shape (roberta-base or vit-base).
      methods: the methods timed, out of full, head, floor and the registered adapter methods.
      batch: sequences or images per batch.
      seq_len: tokens per sequence (text models).
      layers: encoder layers (None: the base model's 12).
      repeats: interleaved timing rounds.
      warmup: untimed steps after compiling.
      rss: measure each method's peak RSS in a fresh subprocess.
      rss_steps: steps each RSS subprocess runs.
      rss_jobs: RSS subprocesses run at a time.
      small: a tiny model, for a smoke run.
      json: also write the results here as JSON.
      rss_only: (internal: what an RSS subprocess runs) build and step only this method, here.
    """

    model: str = "roberta-base"
    methods: Names = (*BASELINE_METHODS, "cdvft")
    batch: int = 16
    seq_len: int = 128
    layers: int | None = None
    repeats: int = 10
    warmup: int = WARMUP_STEPS
    rss: bool = True
    rss_steps: int = RSS_STEPS
    rss_jobs: int = 1
    small: bool = False
    json: Path | None = None
    rss_only: str | None = None

    def __post_init__(self) -> None:
        check_names((self.model,), "model", MODELS)
        check_names(self.methods, "methods", METHODS)
        for name in ("batch", "seq_len", "repeats", "rss_steps", "rss_jobs"):
            check_count(getattr(self, name), name)
        check_count(self.layers, "layers", optional=True)
        check_count(self.warmup, "warmup", low=0)
        if self.rss_only is not None:
            check_names((self.rss_only,), "rss_only", METHODS)


def parse_args(argv: Sequence[str] | None = None) -> StepConfig:
    """The command line of ``python -m benchmarks.step_time``."""
    return parse(StepConfig, argv, prog="python -m benchmarks.step_time", description=StepConfig.__doc__.split("\n")[0])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rss_only:
        rss_only(args.rss_only, args)
        return
    machine, results = run_benchmark(args)
    print(markdown(results, machine))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
