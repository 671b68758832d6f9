"""Floating-point operations of each method's adapter deltas, analytic and as XLA counts them.

Counting convention (the one of :func:`cdvft_jax.cdv_flops_per_token`, which
every method's ``flops_per_token`` / ``flops_per_step`` follows): a real
multiply-add is 2 flops, a lone multiply 1; a complex multiply-add 8; a complex
FFT of ``n`` points costs ``5 n log2 n`` and a real FFT (forward or inverse) half
of that, ``2.5 n log2 n``.  Forward pass only.  A method's work has a part per
token (``flops_per_token``: CDVFT's 1-D FFTs of the activations, LoRA's two
skinny matmuls, FourierFT's ``x @ dW``) and a part per step on the weights alone
(``flops_per_step``: CDVFT's ``rfft(c)``, FourierFT's 2-D inverse FFT that
builds ``dW``), so a layer costs ``tokens * flops_per_token + flops_per_step``.

Columns (per model and method; the ``tokens`` of one train-step batch:
16 x 128 for RoBERTa-base, 16 x 197 for ViT-base):

* ``analytic``: the sum over adapted layers of ``tokens * flops_per_token + flops_per_step``;
* ``xla``: the same scope from XLA: ``cost_analysis()["flops"]`` of the compiled
  forward delta (``method.delta``) of one layer on ``tokens`` rows, times the
  number of adapted layers;
* ``xla_via_dw_layer``: one layer's delta computed the way FourierFT's reference
  code does it, building the dense ``dW`` (``method.delta_weight``: for
  FourierFT a 2-D inverse FFT) and multiplying ``x @ dW``;
* ``xla_train_step``: the whole compiled train step (forward, backward, AdamW)
  as timed by the train-step part, on the model it ran (``train_step_layers``
  encoder layers; ``--quick`` truncates it).

XLA's CPU cost model counts an FFT differently from the convention above (about
``5 n log2 n`` a real FFT, by measurement), so ``xla`` and ``analytic`` agree on
the matmul methods (LoRA, VeRA) but not on the FFT ones.

The paper's ~52x (CDVFT vs FourierFT, arXiv 2505.00580) is discussed in
:func:`paper_comparison`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import cdvft_jax
from benchmarks.common import ADAPTER_METHODS, SEED, model_config, tokens_per_example, xla_flops
from benchmarks.params import abstract_adapted, abstract_model


def compiled_flops(fn: Any, *args: Any) -> float | None:
    """XLA's flop count of ``jax.jit(fn)`` compiled for ``args`` (arrays or ShapeDtypeStructs)."""
    return xla_flops(jax.jit(fn).lower(*args).compile())


def layer_flops(adapted: cdvft_jax.AdaptedModel, path: str, tokens: int) -> dict[str, float | None]:
    """Analytic and XLA forward flops of one adapted layer's delta on ``tokens`` rows."""
    layer = adapted.layers[path]
    method, config = adapted.method, layer.config
    d_in, d_out = layer.d_in, layer.d_out
    params = method.init(jax.random.key(SEED), d_in, d_out, config, path)
    x = jax.ShapeDtypeStruct((tokens, d_in), jnp.float32)
    per_token = float(method.flops_per_token(d_in, d_out, config, path))
    per_step = float(method.flops_per_step(d_in, d_out, config, path))
    return {
        "analytic": tokens * per_token + per_step,
        "analytic_per_token": per_token,
        "analytic_per_step": per_step,
        "xla_delta": compiled_flops(lambda p, x: method.delta(p, x, d_out, config, None), params, x),
        "xla_via_dw": compiled_flops(lambda p, x: x @ method.delta_weight(p, d_in, d_out, config), params, x),
    }


def flops_rows(
    kind: str,
    methods: Sequence[str],
    batch: int,
    seq_len: int,
    train_step_flops: Mapping[str, float | None] | None = None,
    train_step_layers: int | None = None,
    small: bool = False,
) -> list[dict[str, Any]]:
    """One row per method of ``kind`` (full size unless ``small``); baselines have no adapter flops."""
    tokens = batch * tokens_per_example(model_config(small, kind), kind, seq_len)
    model, base = abstract_model(kind, small)
    step = dict(train_step_flops or {})
    rows = []
    for method in methods:
        row: dict[str, Any] = {"model": kind, "method": method, "tokens": tokens}
        if method in ADAPTER_METHODS:
            adapted, _ = abstract_adapted(method, kind, model, base)
            # Every adapted layer of these configs has the same shape and config (query, value: d x d).
            kinds = {(layer.d_in, layer.d_out, layer.config) for layer in adapted.layers.values()}
            per_layer: dict[tuple, dict[str, float | None]] = {}
            analytic = xla = 0.0
            for path, layer in adapted.layers.items():
                key = (layer.d_in, layer.d_out, layer.config)
                if key not in per_layer:
                    per_layer[key] = layer_flops(adapted, path, tokens)
                analytic += per_layer[key]["analytic"]
                xla += per_layer[key]["xla_delta"] or 0.0
            first = per_layer[next(iter(per_layer))]
            row |= {
                "analytic": analytic,
                "xla": xla,
                "adapted_layers": len(adapted.layers),
                "layer_shapes": len(kinds),
                "analytic_per_token_layer": first["analytic_per_token"],
                "analytic_per_step_layer": first["analytic_per_step"],
                "xla_delta_layer": first["xla_delta"],
                "xla_via_dw_layer": first["xla_via_dw"],
            }
        else:
            row |= {"analytic": 0.0, "xla": 0.0, "adapted_layers": 0}
        row["xla_train_step"] = step.get(method)
        row["train_step_layers"] = train_step_layers
        rows.append(row)
    return rows


def paper_comparison(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """FourierFT / CDVFT flop ratios per model, and what it takes to get the paper's ~52x.

    * ``analytic``: ``tokens * flops_per_token + flops_per_step`` of each
      (FourierFT: ``2 d^2`` a token plus the 2-D inverse FFT; CDVFT: 1-D FFTs);
    * ``XLA delta``: the compiled forward deltas as implemented;
    * ``per token only``: the per-token parts alone (``2 d^2`` against CDVFT's);
    * ``k for 52x``: the cost ``k n log2 n`` of one real FFT of ``n`` points
      that makes the ``analytic`` ratio 52 (CDVFT's elementwise work and
      FourierFT's count kept; this module's convention is ``k = 2.5``).
    """
    out = []
    for kind in dict.fromkeys(r["model"] for r in rows):
        by = {r["method"]: r for r in rows if r["model"] == kind}
        cdv, fft = by.get("cdvft"), by.get("fourierft")
        if not cdv or not fft or not cdv["analytic"]:
            continue
        entry: dict[str, Any] = {"model": kind, "tokens": cdv["tokens"]}
        entry["analytic"] = fft["analytic"] / cdv["analytic"]
        entry["XLA delta"] = fft["xla"] / cdv["xla"] if cdv["xla"] else None
        entry["XLA FourierFT via dW / CDVFT delta"] = (
            fft["xla_via_dw_layer"] / cdv["xla_delta_layer"] if cdv.get("xla_delta_layer") else None
        )
        cdv_token, fft_token = cdv["analytic_per_token_layer"], fft["analytic_per_token_layer"]
        entry["per token only"] = fft_token / cdv_token
        # CDVFT, one block of d: per token 2 d diagonal + (d/2 + 1) * 8 spectral + 2 real FFTs of
        # k d log2 d, per step one real FFT of c; solve sum over layers == FourierFT's total / 52 for k.
        tokens, layers = cdv["tokens"], cdv["adapted_layers"]
        d = round(math.sqrt(fft_token / 2.0))
        fft_log = d * math.log2(d)
        elementwise = 2 * d + (d // 2 + 1) * 8
        target = fft["analytic"] / 52.0 / layers
        entry["k for 52x"] = (target - tokens * elementwise) / ((2 * tokens + 1) * fft_log)
        out.append(entry)
    return out


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The flops table and the CDVFT-vs-FourierFT ratios."""
    lines = [
        "Adapter flops, forward, one train-step batch (real FFT = 2.5 n log2 n, multiply-add = 2); "
        "XLA = compiled cost_analysis",
        "",
        "| model | method | tokens | analytic (all layers) | XLA (all layers) | analytic / token / layer "
        "| XLA via dW / layer | XLA train step (layers) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['tokens']:,} | {_num(r['analytic'])} | {_num(r['xla'])} "
            f"| {_num(r.get('analytic_per_token_layer'))} | {_num(r.get('xla_via_dw_layer'))} "
            f"| {_num(r['xla_train_step'])} ({r['train_step_layers'] or '-'}) |"
        )
    comparison = paper_comparison(rows)
    if comparison:
        keys = [k for k in comparison[0] if k not in ("model", "tokens")]
        lines += ["", "FourierFT / CDVFT flop ratio (the paper claims ~52x on RoBERTa-base, 51.9x on ViT-base)", ""]
        lines += ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for entry in comparison:
            lines.append(f"| {entry['model']} | " + " | ".join(_num(entry.get(k)) for k in keys) + " |")
    return "\n".join(lines)
