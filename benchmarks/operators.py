"""Operator micro-benchmark: the CDV delta against a dense ``dW`` matmul and LoRA's two skinny matmuls.

For a ``d x d`` layer and ``tokens`` rows of float32 activations ``x``:

* ``cdv`` (one per block size ``p``): :func:`cdvft_jax.cdv_delta` with
  ``a_in (d,)``, ``c (d/p, d/p, p)``, ``a_out (d,)``;
* ``dense``: ``x @ dW`` with ``dW (d, d)`` given (materialised);
* ``lora``: ``(x @ A) @ B`` with ``A (d, 8)``, ``B (8, d)``.

``fwd`` times the jitted forward; ``fwd+bwd`` the jitted value and gradient of
``sum(g * delta)`` for a random cotangent ``g``, with respect to every parameter
and ``x``: what a train step needs.  (A cotangent
of ones would let XLA fold the backward matmuls into reductions.)  Each
function is compiled and run once, then timed ``repeats`` times
(``time.perf_counter`` around the call and ``block_until_ready``); the table
gives the median in ms, XLA's flop count of the compiled function, and the CDV
time over the dense and LoRA times of the same ``(d, tokens, direction)``, and
over the one-block CDV (``p = d``) time: what splitting the circulant into
``(d/p)^2`` blocks costs (e.g. ``p = 256`` against ``p = d`` at ``d = 4096``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import cdvft_jax
from benchmarks.common import SEED, log, xla_flops

LORA_RANK = 8
DIRECTIONS = ("fwd", "fwd+bwd")


def dense_delta(x: jax.Array, w: jax.Array) -> jax.Array:
    return x @ w


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    return (x @ a) @ b


def operands(op: str, d: int, tokens: int, p: int | None = None) -> tuple[jax.Array, ...]:
    """Random float32 ``(x, *params)`` of operator ``op``."""
    rng = np.random.default_rng(SEED)

    def normal(*shape: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    x = normal(tokens, d)
    if op == "dense":
        return x, normal(d, d) / np.sqrt(d)
    if op == "lora":
        return x, normal(d, LORA_RANK), normal(LORA_RANK, d)
    if op == "cdv":
        assert p is not None
        return x, normal(d), normal(d // p, d // p, p) / np.sqrt(p), normal(d)
    raise ValueError(f"unknown operator {op!r}")


FUNCTIONS: dict[str, Callable[..., jax.Array]] = {"dense": dense_delta, "lora": lora_delta, "cdv": cdvft_jax.cdv_delta}


def as_direction(fn: Callable[..., jax.Array], direction: str, args: tuple[jax.Array, ...]) -> tuple[Callable, tuple]:
    """``(fn, args)``, or for ``fwd+bwd`` the value and gradient of ``sum(g * fn(*args))`` and ``(g, *args)``."""
    if direction == "fwd":
        return fn, args
    arity = len(args)

    def forward_backward(g: jax.Array, *xs: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        return jax.value_and_grad(lambda *ys: jnp.sum(g * fn(*ys)), argnums=tuple(range(arity)))(*xs)

    g = jnp.asarray(np.random.default_rng(SEED + 1).standard_normal(args[0].shape, dtype=np.float32))
    return forward_backward, (g, *args)


def time_call(fn: Callable[..., Any], args: Sequence[jax.Array], repeats: int) -> tuple[float, float | None]:
    """``(median ms, XLA flops)`` of the jitted ``fn`` on ``args``, after one untimed run."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), xla_flops(compiled)


def block_sizes(d: int, wanted: Sequence[int | None]) -> list[int]:
    """``wanted`` block sizes (``None`` = ``d``) that divide ``d``, distinct, in order."""
    sizes = [d if p is None else p for p in wanted]
    return list(dict.fromkeys(p for p in sizes if d % p == 0))


def operator_rows(
    dims: Sequence[int], tokens: Sequence[int], blocks: Sequence[int | None], repeats: int
) -> list[dict[str, Any]]:
    """One row per ``(d, tokens, direction, operator)``.

    CDV rows carry the ratios to dense, to LoRA and, when ``blocks`` includes
    ``p = d``, to the one-block CDV.
    """
    rows = []
    for d in dims:
        for t in tokens:
            ops = [("dense", None), ("lora", None)] + [("cdv", p) for p in block_sizes(d, blocks)]
            for direction in DIRECTIONS:
                group = []
                for op, p in ops:
                    fn, args = as_direction(FUNCTIONS[op], direction, operands(op, d, t, p))
                    ms, flops = time_call(fn, args, repeats)
                    del args
                    name = op if p is None else f"cdv p={p}"
                    row = {"d": d, "tokens": t, "direction": direction, "op": name, "block_size": p}
                    group.append(row | {"ms": ms, "xla_flops": flops, "repeats": repeats})
                base = {r["op"]: r["ms"] for r in group}
                for row in group:
                    if row["block_size"] is not None:
                        row["ratio_to_dense"] = row["ms"] / base["dense"]
                        row["ratio_to_lora"] = row["ms"] / base["lora"]
                        if f"cdv p={d}" in base:
                            row["ratio_to_one_block"] = row["ms"] / base[f"cdv p={d}"]
                rows += group
                timings = ", ".join(f"{r['op']} {r['ms']:.2f} ms" for r in group)
                log(f"operator d={d} tokens={t} {direction}: {timings}")
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The operator table."""

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    repeats = rows[0]["repeats"] if rows else 0
    lines = [
        f"Operator, float32, jitted, median of {repeats} (ms); ratios = CDV time / dense, LoRA (r={LORA_RANK}) "
        "or one-block CDV (p = d) time",
        "",
        "| d | tokens | direction | operator | ms | XLA flops | CDV / dense | CDV / LoRA | CDV / (p = d) |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['tokens']:,} | {r['direction']} | {r['op']} | {r['ms']:.3f} "
            f"| {fmt(r['xla_flops'], '.3g')} | {fmt(r.get('ratio_to_dense'), '.2f')} "
            f"| {fmt(r.get('ratio_to_lora'), '.2f')} | {fmt(r.get('ratio_to_one_block'), '.2f')} |"
        )
    return "\n".join(lines)
