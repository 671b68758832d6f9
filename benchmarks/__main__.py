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

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import accuracy, common, flops, operators, params, step_time
from benchmarks.common import MODELS, log, names_parser, positive_int
from benchmarks.step_time import add_step_arguments, parse_methods

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
        "no_rss": False,
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
        "no_rss": True,
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
        "no_rss": False,
        "layers": None,
        "dims": (64,),
        "tokens": (32,),
        "blocks": (8, None),
        "op_repeats": 1,
    },
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, metavar="PATH", required=True, help="write the results here")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores (the accuracy part: hours)")
    mode.add_argument("--tiny", "--small", dest="tiny", action="store_true", help="tiny models, a smoke test")
    parser.add_argument(
        "--parts",
        type=names_parser(PARTS),
        default=list(DEFAULT_PARTS),
        help="comma-separated parts (accuracy: opt-in)",
    )
    parser.add_argument("--accuracy-model", help="the accuracy part's model folder (default: the real MiniLM)")
    parser.add_argument("--models", type=names_parser(MODELS), default=list(MODELS), help="comma-separated models")
    parser.add_argument("--methods", type=parse_methods, default=list(common.METHODS), help="comma-separated")
    parser.add_argument("--repeats", type=positive_int, help="interleaved train-step rounds (default: by mode)")
    add_step_arguments(parser)
    parser.add_argument("--rss", dest="no_rss", action="store_false", help="measure peak RSS (off in --quick)")
    for action in parser._actions:  # the mode picks these unless given
        if action.dest in ("layers", "warmup", "rss_steps", "rss_jobs", "no_rss"):
            action.default = None
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "tiny" if args.tiny else "full"
    settings = MODES[args.mode]
    for key in ("repeats", "warmup", "rss_steps", "rss_jobs", "no_rss", "layers"):
        if getattr(args, key) is None:
            setattr(args, key, settings[key])
    args.small = args.tiny
    return args


def train_step_part(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], list[str]]:
    """Rows of every model, the per-model settings, and the markdown tables."""
    rows, settings, tables = [], {}, []
    for kind in args.models:
        run_args = argparse.Namespace(**{**vars(args), "model": kind})
        machine, results = step_time.run_benchmark(run_args)
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
            "rss_steps": None if args.no_rss else args.rss_steps,
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
