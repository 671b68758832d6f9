"""The benchmark suite (issue 6): train step, parameter counts, flops and the CDV operator.

Running it
----------
From the repository root::

    python -m benchmarks --json results.json          # full: about 35 min on 2 CPU cores
    python -m benchmarks --json results.json --quick  # a few minutes (see below)
    python -m benchmarks --json out.json --tiny       # tiny models and grid, seconds (the test)
    python -m benchmarks --json out.json --parts params,flops --models roberta-base

Markdown tables go to stdout, progress to stderr.

Parts
-----
``train_step``
    :mod:`benchmarks.step_time` for each model (``roberta-base``: 16 x 128 tokens;
    ``vit-base``: 16 images of 224 px, patch 16) and every method (``full``,
    ``head``, ``floor`` and every registered adapter method): interleaved
    repeats, median / min / max ms per step, tokens/s, peak RSS (a fresh
    subprocess a method), ratio to ``floor``.
``params``
    :mod:`benchmarks.params`: trainable counts (adapter + head, adapter only)
    and each adapter's ratio to CDVFT's, on abstract shapes.
``flops``
    :mod:`benchmarks.flops`: analytic and XLA flops of the adapter deltas, the
    XLA flops of the whole compiled train step, and the FourierFT / CDVFT ratio
    against the paper's ~52x.
``operator``
    :mod:`benchmarks.operators`: CDV delta vs dense ``x @ dW`` vs LoRA r=8.
``accuracy`` (only when named in ``--parts``: the full grid takes hours)
    :mod:`benchmarks.accuracy`: methods x tasks x seeds on the real MiniLM; its records go to
    ``<json>.accuracy.json`` (resumable, with ``.md`` and ``.png`` beside it) and into this JSON.
    ``--quick`` runs one seed; ``--tiny`` two steps of two methods on 80 SST-2 examples with
    ``--accuracy-model`` (a tiny model folder).

Modes
-----
* full (default): 12-layer models, 5 interleaved repeats after 2 warm-up steps,
  peak RSS over 3 steps (two RSS subprocesses at a time); operator ``d`` in 768, 1024, 4096, ``tokens`` in 512,
  2048, 16384, block sizes 64, 256, ``d``, 3 repeats.
* ``--quick``: the train step on the models truncated to 2 encoder layers (full
  width, same batch; 14 compilations of the 12-layer models alone take longer
  than the budget), 2 repeats after 1 warm-up step, RSS over 1 step; operator
  tokens 512 and 2048.  Params and the analytic / per-layer XLA flops are always
  those of the 12-layer models.
* ``--tiny``: tiny models and a tiny operator grid, 1 repeat: a smoke test.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import tyro

from benchmarks import accuracy, common, flops, operators, params, step_time
from benchmarks.common import MODELS, log
from train.cli import ConfigError, Names, check_count, check_names, parse

PARTS = ("train_step", "params", "flops", "operator", "accuracy")
DEFAULT_PARTS = PARTS[:4]
# The accuracy suite's arguments by mode (main adds the JSON path and the model).
ACCURACY_ARGS = {
    "full": [],
    "quick": ["--seeds", "0", "--methods", "cdvft,lora,head,full"],
    "tiny": "--tasks sst2 --methods cdvft,head --seeds 0 --steps 2 --batch-size 8 --max-train-samples 80".split(),
}
MODES: dict[str, dict[str, Any]] = {
    "full": {
        "repeats": 5,
        "warmup": 2,
        "rss_steps": 3,
        "rss_jobs": 2,
        "rss": True,
        "layers": None,
        "dims": (768, 1024, 4096),
        "tokens": (512, 2048, 16384),
        "blocks": (64, 256, None),
        "op_repeats": 3,
    },
    "quick": {
        "repeats": 2,
        "warmup": 1,
        "rss_steps": 1,
        "rss_jobs": 2,
        "rss": False,
        "layers": 2,
        "dims": (768, 1024, 4096),
        "tokens": (512, 2048),
        "blocks": (64, 256, None),
        "op_repeats": 3,
    },
    "tiny": {
        "repeats": 1,
        "warmup": 0,
        "rss_steps": 1,
        "rss_jobs": 2,
        "rss": True,
        "layers": None,
        "dims": (64,),
        "tokens": (32,),
        "blocks": (8, None),
        "op_repeats": 1,
    },
}


@dataclasses.dataclass(frozen=True)
class Mode:
    """The suite's mode, which sets the train-step defaults of :class:`SuiteConfig` (:data:`MODES`).

    Attributes:
      quick: a few minutes on 2 CPU cores (the accuracy part: hours).
      tiny: tiny models and grid, a smoke test.
    """

    quick: Annotated[bool, tyro.conf.FlagCreatePairsOff] = False
    tiny: Annotated[bool, tyro.conf.FlagCreatePairsOff, tyro.conf.arg(aliases=("--small",))] = False

    def __post_init__(self) -> None:
        if self.quick and self.tiny:
            raise ConfigError("--quick and --tiny are two modes: give one")

    @property
    def name(self) -> str:
        """full, quick or tiny."""
        return "quick" if self.quick else "tiny" if self.tiny else "full"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SuiteConfig(Mode):
    """The benchmark suite: train step, parameter counts, flops and the CDV operator (and the accuracy suite).

    The train-step defaults are the mode's (``--help --quick`` shows those of ``--quick``).

    Attributes:
      json: write the results here.
      parts: the parts run, out of train_step, params, flops, operator and accuracy (accuracy: opt-in).
      accuracy_model: the accuracy part's model folder (None: the real MiniLM).
      models: the model shapes, out of roberta-base and vit-base.
      methods: the methods, out of full, head, floor and the registered adapter methods.
      batch: sequences or images per train-step batch.
      seq_len: tokens per sequence (text models).
      repeats: interleaved train-step rounds.
      layers: encoder layers of the train-step models (None: the full models' 12).
      warmup: untimed train steps after compiling.
      rss: measure each method's peak RSS in a fresh subprocess.
      rss_steps: steps each RSS subprocess runs.
      rss_jobs: RSS subprocesses run at a time.
    """

    json: Path
    parts: Names = DEFAULT_PARTS
    accuracy_model: str | None = None
    models: Names = MODELS
    methods: Names = common.METHODS
    batch: int = 16
    seq_len: int = 128
    repeats: int = MODES["full"]["repeats"]
    layers: int | None = MODES["full"]["layers"]
    warmup: int = MODES["full"]["warmup"]
    rss: bool = MODES["full"]["rss"]
    rss_steps: int = MODES["full"]["rss_steps"]
    rss_jobs: int = MODES["full"]["rss_jobs"]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_names(self.parts, "parts", PARTS)
        check_names(self.models, "models", MODELS)
        check_names(self.methods, "methods", common.METHODS)
        for name in ("batch", "seq_len", "repeats", "rss_steps", "rss_jobs"):
            check_count(getattr(self, name), name)
        check_count(self.layers, "layers", optional=True)
        check_count(self.warmup, "warmup", low=0)

    @property
    def mode(self) -> str:
        """full, quick or tiny."""
        return self.name

    @property
    def small(self) -> bool:
        """Tiny models (the ``--tiny`` mode)."""
        return self.tiny

    def step_config(self, model: str) -> step_time.StepConfig:
        """The train-step benchmark of ``model`` with this suite's settings."""
        return step_time.StepConfig(
            model=model,
            methods=self.methods,
            small=self.small,
            **{name: getattr(self, name) for name in STEP_SETTINGS},
        )


# The train-step settings that a mode sets and a flag overrides.
STEP_SETTINGS = ("batch", "seq_len", "repeats", "layers", "warmup", "rss", "rss_steps", "rss_jobs")


def parse_args(argv: Sequence[str] | None = None) -> SuiteConfig:
    """The command line of ``python -m benchmarks``: the mode first, whose settings become the defaults."""
    prog, description = "python -m benchmarks", SuiteConfig.__doc__.split("\n")[0]
    mode, _ = parse(Mode, argv, prog=prog, description=description, return_unknown_args=True, add_help=False)
    settings = {k: v for k, v in MODES[mode.name].items() if k in STEP_SETTINGS}
    return parse(
        SuiteConfig,
        argv,
        prog=prog,
        description=description,
        default=SuiteConfig(json=tyro.MISSING, **settings),
    )


def train_step_part(args: SuiteConfig) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], list[str]]:
    """Rows of every model, the per-model settings, and the markdown tables."""
    rows, settings, tables = [], {}, []
    for kind in args.models:
        machine, results = step_time.run_benchmark(args.step_config(kind))
        settings[kind] = {k: machine[k] for k in ("model", "batch", "seq_len", "repeats")}
        tables.append(step_time.markdown(results, machine))
        rows += [{"model": kind, **r} for r in results]
    return rows, settings, tables


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = MODES[args.mode]
    out: dict[str, Any] = {"machine": {}, "train_step": [], "params": [], "flops": [], "operator": [], "accuracy": []}
    seconds: dict[str, float] = {}
    tables: list[str] = []
    start = time.perf_counter()

    if "train_step" in args.parts:
        log("== train step")
        t0 = time.perf_counter()
        out["train_step"], models, step_tables = train_step_part(args)
        tables += step_tables
        seconds["train_step"] = time.perf_counter() - t0
    else:
        models = {}
    if "params" in args.parts:
        log("== params")
        t0 = time.perf_counter()
        for kind in args.models:
            out["params"] += params.param_rows(kind, args.methods, small=args.small)
        tables.append(params.markdown(out["params"]))
        seconds["params"] = time.perf_counter() - t0
    if "flops" in args.parts:
        log("== flops")
        t0 = time.perf_counter()
        for kind in args.models:
            step = {r["method"]: r["xla_flops"] for r in out["train_step"] if r["model"] == kind}
            layers = args.layers or common.model_config(args.small, kind).num_hidden_layers
            out["flops"] += flops.flops_rows(
                kind, args.methods, args.batch, args.seq_len, step, layers if step else None, small=args.small
            )
        tables.append(flops.markdown(out["flops"]))
        seconds["flops"] = time.perf_counter() - t0
    if "operator" in args.parts:
        log("== operator")
        t0 = time.perf_counter()
        out["operator"] = operators.operator_rows(
            settings["dims"], settings["tokens"], settings["blocks"], settings["op_repeats"]
        )
        tables.append(operators.markdown(out["operator"]))
        seconds["operator"] = time.perf_counter() - t0

    if "accuracy" in args.parts:
        log("== accuracy")
        t0 = time.perf_counter()
        records_path = args.json.with_suffix(".accuracy.json")
        accuracy_argv = ["--json", str(records_path), *ACCURACY_ARGS[args.mode]]
        if args.accuracy_model:
            accuracy_argv += ["--model", args.accuracy_model]
        out["accuracy"] = accuracy.main(accuracy_argv)["runs"]
        tables.append(records_path.with_suffix(".md").read_text())
        seconds["accuracy"] = time.perf_counter() - t0

    seconds["total"] = time.perf_counter() - start
    out["machine"] = {
        **common.host_info(),
        "mode": args.mode,
        "command": " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)]),
        "parts": args.parts,
        "train_step": {
            "models": models,
            "layers": args.layers,
            "warmup": args.warmup,
            "rss_steps": args.rss_steps if args.rss else None,
        },
        "operator": {k: settings[k] for k in ("dims", "tokens", "blocks", "op_repeats")},
        "seconds": seconds,
    }
    print("\n\n".join(tables))
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    log(f"wrote {args.json} in {seconds['total']:.0f} s")
    return out


if __name__ == "__main__":
    main()
