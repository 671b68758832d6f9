"""How lossy a low-rank (peft LoRA) export of a trained adapter is: per-layer SVD errors at several ranks.

For each adapted layer of a saved adapter, the scaled update ``alpha * dW`` is factored by a truncated SVD
(:func:`cdvft_jax.peft_lora.low_rank_factors`, what :func:`cdvft_jax.save_peft_lora` writes) and the
relative error ``||dW - dW_r||_F / ||dW||_F`` is reported at each rank, with the numerical rank of ``dW``
and the ranks that keep 90% and 99% of its squared singular values; min, median and max over the layers.

Running it
----------
::

    python -m train.text --output-dir runs/quick          # the quickstart: a CDVFT adapter of real MiniLM
    python -m benchmarks.lowrank_export --adapter runs/quick/adapter --num-labels 3 --json out.json
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import cdvft_jax
from cdvft_jax.export import load_base_model
from cdvft_jax.params import flat_params
from cdvft_jax.peft_lora import low_rank_factors
from train.cli import Floats, Ints, check_count, check_distinct, parse


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankConfig:
    """Per-layer errors of truncated-SVD exports of a saved adapter.

    Attributes:
      adapter: the adapter folder (a program's OUTPUT_DIR/adapter).
      base: the base model folder (None: the one the adapter records).
      num_labels: the classifier size the adapter was trained with.
      ranks: the ranks at which the relative error is reported.
      energies: the shares of squared singular values whose ranks are reported.
      json: also write the results here as JSON.
    """

    adapter: Path
    base: str | None = None
    num_labels: int
    ranks: Ints = (8, 32, 128, 256)
    energies: Floats = (0.9, 0.99)
    json: Path | None = None

    def __post_init__(self) -> None:
        check_count(self.num_labels, "num_labels")
        check_distinct(self.ranks, "ranks", low=1)
        check_distinct(self.energies, "energies", low=0, strict=True)


def layer_rows(config: LowRankConfig) -> dict[str, dict[str, float]]:
    """``{layer: {statistic: value}}`` for every adapted layer of the adapter."""
    info = cdvft_jax.read_adapter_config(config.adapter)
    model = load_base_model(config.base or info["base_model"], info["base_model_class"], config.num_labels, False)
    adapted, params = cdvft_jax.load_adapter(config.adapter, model)
    flat = flat_params(params)
    rows = {}
    for path, layer in adapted.layers.items():
        leaves = {name: flat[f"{path}/{name}"] for name in layer.param_shapes}
        weight = layer.config.adapter_method.delta_weight(leaves, layer.d_in, layer.d_out, layer.config)
        update = layer.config.scaling * np.asarray(weight, np.float64).T
        values = np.linalg.svd(update, compute_uv=False)
        row = {"full_rank": len(values), "numerical_rank": int(np.sum(values > values[0] * 1e-6))}
        row |= {f"error_at_rank_{r}": low_rank_factors(update, rank=r)[2].relative_error for r in config.ranks}
        row |= {f"rank_for_energy_{e:g}": low_rank_factors(update, energy=e)[2].rank for e in config.energies}
        rows[path] = row
    return rows


def summary(rows: dict[str, dict[str, float]]) -> dict[str, tuple[float, float, float]]:
    """``{statistic: (min, median, max)}`` over the layers."""
    names = next(iter(rows.values()))
    return {
        n: (
            min(r[n] for r in rows.values()),
            statistics.median(r[n] for r in rows.values()),
            max(r[n] for r in rows.values()),
        )
        for n in names
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m benchmarks.lowrank_export``; prints a table and returns the JSON content."""
    config = parse(LowRankConfig, argv, prog="python -m benchmarks.lowrank_export", description=__doc__.split("\n")[0])
    rows = layer_rows(config)
    stats = summary(rows)
    print(f"{len(rows)} adapted layers of {config.adapter}: median (min-max) over the layers")
    print("\n| statistic | median | min | max |\n|---|---:|---:|---:|")
    for name, (low, middle, high) in stats.items():
        print(f"| {name} | {middle:.3g} | {low:.3g} | {high:.3g} |")
    out = {"adapter": str(config.adapter), "layers": rows, "summary": stats}
    if config.json:
        config.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
