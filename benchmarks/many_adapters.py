"""Many adapters in one batch (issue 14): throughput as the number of distinct adapters grows.

For each method and each N, a batch of ``--batch`` rows in which row ``b`` belongs to adapter ``b mod N``
is scored three ways, on a BERT-base-shaped classifier (random weights, query/value adapted, the
classifier head per adapter):

* ``mixed``: the N adapters stacked (:func:`cdvft_jax.stack_adapters`), one forward pass with
  ``adapter_ids``;
* ``one_at_a_time``: each adapter's rows as their own forward pass with that adapter;
* ``merged_swap``: for each adapter, its ``dW`` merged into the kernels (:meth:`AdaptedModel.merge`), then
  the plain model on its rows.

Each is timed (median of ``--repeats`` interleaved rounds after a compiled warm-up) as examples per second;
``ratio_to_single`` divides by one adapter's own throughput on the whole batch (the ``single`` row).
Memory per added adapter is the size of one adapter's trainable tree (adapter + head) at the full
12-layer shape, counted from abstract shapes.

Running it
----------
::

    python -m benchmarks.many_adapters --json benchmarks/many_adapters_cpu.json     # 2 layers, CPU: minutes
    python -m benchmarks.many_adapters --tiny --json out.json                        # a smoke run, seconds
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import cdvft_jax
from benchmarks.common import SEED, adapter_config, host_info, log
from cdvft_jax.params import Params, flat_params, merge_params, unflat_params
from train.cli import ConfigError, Ints, Names, check_count, check_distinct, check_names, parse

METHODS = ("cdvft", "lora")
WAYS = ("mixed", "one_at_a_time", "merged_swap")


@dataclasses.dataclass(frozen=True)
class ManyConfig:
    """Throughput of mixed-adapter batches against one adapter at a time and merged-weight swaps.

    Attributes:
      counts: the numbers of distinct adapters N.
      methods: the adapter methods, out of cdvft and lora (r=8).
      batch: rows per batch (N <= batch, so every adapter has rows).
      seq_len: tokens per row.
      layers: encoder layers of the BERT-base-shaped model.
      repeats: interleaved timing rounds.
      tiny: a tiny model and grid, a smoke run.
      json: also write the results here as JSON.
    """

    counts: Ints = (1, 8, 64, 512)
    methods: Names = METHODS
    batch: int = 512
    seq_len: int = 32
    layers: int = 2
    repeats: int = 3
    tiny: bool = False
    json: Path | None = None

    def __post_init__(self) -> None:
        check_distinct(self.counts, "counts", low=1)
        check_names(self.methods, "methods", METHODS)
        for name in ("batch", "seq_len", "layers", "repeats"):
            check_count(getattr(self, name), name)
        if max(self.counts) > self.batch:
            raise ConfigError(f"--counts up to {max(self.counts)} need --batch >= {max(self.counts)}")


def model_config(config: ManyConfig, layers: int | None = None) -> Any:
    from transformers import BertConfig

    tiny = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 500}
    return BertConfig(num_labels=2, num_hidden_layers=layers or config.layers, **(tiny if config.tiny else {}))


def adapters_like(trainable: Params, count: int) -> list[Params]:
    """``count`` distinct adapters: ``trainable`` moved by seeded noise (as if each were trained)."""
    flat = flat_params(trainable)
    out = []
    for number in range(count):
        key = jax.random.key(number + 1)
        moved = {
            p: v + 0.02 * jax.random.normal(jax.random.fold_in(key, i), v.shape)
            for i, (p, v) in enumerate(flat.items())
        }
        out.append(unflat_params(moved))
    return out


def bytes_per_adapter(method: str) -> dict[str, int]:
    """Float32 bytes one more adapter adds, at the full 12-layer BERT-base shape: adapter, and with head."""
    from transformers import FlaxBertForSequenceClassification

    model = FlaxBertForSequenceClassification(model_config(ManyConfig(layers=12)), seed=SEED, _do_init=False)
    adapted = cdvft_jax.inject(model, adapter_config(method, "roberta-base"))
    shapes = adapted.trainable_shapes()
    adapter = sum(int(np.prod(s)) for p, s in shapes.items() if adapted.is_adapter_leaf(p))
    total = sum(int(np.prod(s)) for s in shapes.values())
    return {"adapter_bytes": 4 * adapter, "with_head_bytes": 4 * total}


def timed(functions: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function over interleaved rounds, after one untimed call each."""
    for run in functions.values():
        jax.block_until_ready(run())
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, run in functions.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def method_rows(method: str, config: ManyConfig) -> list[dict[str, Any]]:
    """The rows of one method: ``single`` and each (N, way)."""
    from transformers import FlaxBertForSequenceClassification

    model = FlaxBertForSequenceClassification(model_config(config), seed=SEED)
    adapted = cdvft_jax.inject(model, adapter_config(method, "roberta-base"))
    trainable, frozen = adapted.split(adapted.init(jax.random.key(SEED), model.params))
    adapters = adapters_like(trainable, max(config.counts))
    rng = np.random.default_rng(SEED)
    ids = jnp.asarray(rng.integers(3, model.config.vocab_size, (config.batch, config.seq_len)), jnp.int32)

    adapted_logits = jax.jit(lambda params, ids: adapted(ids, params=params).logits)
    stacked_logits = jax.jit(lambda params, ids, rows: adapted(ids, params=params, adapter_ids=rows).logits)
    plain_logits = jax.jit(lambda params, ids: model(ids, params=params).logits)
    merge = jax.jit(lambda params: adapted.merge(params, check_finite=False))

    log(f"[{method}] single adapter, {config.batch} rows")
    first = merge_params(adapters[0], frozen)
    single = timed({"single": lambda: adapted_logits(first, ids)}, config.repeats)["single"]
    rows = [{"method": method, "adapters": 1, "way": "single", "seconds": single}]
    for count in config.counts:
        log(f"[{method}] {count} adapters")
        group = config.batch // count  # rows per adapter; the batch is trimmed to count * group rows
        used = count * group
        owner = jnp.arange(used) % count
        order = jnp.argsort(owner, stable=True)  # the rows of adapter k, together, for the per-adapter ways
        stacked = merge_params(cdvft_jax.stack_adapters(adapted, adapters[:count]), frozen)
        each = [merge_params(a, frozen) for a in adapters[:count]]
        grouped = ids[:used][order].reshape(count, group, config.seq_len)

        def one_at_a_time(each=each, grouped=grouped):
            return [adapted_logits(params, rows) for params, rows in zip(each, grouped, strict=True)]

        def merged_swap(each=each, grouped=grouped):
            return [plain_logits(merge(params), rows) for params, rows in zip(each, grouped, strict=True)]

        seconds = timed(
            {
                "mixed": lambda stacked=stacked, used=used, owner=owner: stacked_logits(stacked, ids[:used], owner),
                "one_at_a_time": one_at_a_time,
                "merged_swap": merged_swap,
            },
            config.repeats,
        )
        # The ways must agree on every row's logits, or their speeds compare different work.
        per_adapter = jnp.concatenate(one_at_a_time())
        mixed = stacked_logits(stacked, ids[:used], owner)[order]
        swapped = jnp.concatenate(merged_swap())
        difference = max(float(jnp.max(jnp.abs(mixed - per_adapter))), float(jnp.max(jnp.abs(swapped - per_adapter))))
        if not difference <= 1e-4 * float(jnp.max(jnp.abs(per_adapter))):
            raise AssertionError(f"{method}, {count} adapters: the ways' logits differ by {difference}")
        for way in WAYS:
            rows.append(
                {"method": method, "adapters": count, "way": way, "seconds": seconds[way], "rows": used}
                | {"max_logit_difference": difference}
            )
    for row in rows:
        row["rows"] = row.get("rows", config.batch)
        row["examples_per_second"] = row["rows"] / row["seconds"]
        row["ratio_to_single"] = row["examples_per_second"] / (config.batch / single)
    return rows


def markdown(rows: Sequence[dict[str, Any]], memory: dict[str, dict[str, int]], config: ManyConfig) -> str:
    lines = [
        f"Mixed-adapter batches, BERT-base-shaped ({config.layers} layers{', tiny' if config.tiny else ''}), "
        f"{config.batch} rows x {config.seq_len} tokens, median of {config.repeats}: examples/s "
        "(ratio to one adapter on the whole batch)",
        "",
        "| method | adapters | " + " | ".join(WAYS) + " |",
        "|---|---:|" + "---:|" * len(WAYS),
    ]
    for method in config.methods:
        single = next(r for r in rows if r["method"] == method and r["way"] == "single")
        lines.append(f"| {method} | single | {single['examples_per_second']:.0f} (1.00) | - | - |")
        for count in config.counts:
            cells = []
            for way in WAYS:
                row = next(r for r in rows if (r["method"], r["adapters"], r["way"]) == (method, count, way))
                cells.append(f"{row['examples_per_second']:.0f} ({row['ratio_to_single']:.2f})")
            lines.append(f"| {method} | {count} | " + " | ".join(cells) + " |")
    lines += ["", "| method | KB per added adapter (adapter only) | with its head |", "|---|---:|---:|"]
    for method, sizes in memory.items():
        lines.append(f"| {method} | {sizes['adapter_bytes'] / 1024:.0f} | {sizes['with_head_bytes'] / 1024:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m benchmarks.many_adapters``; returns the JSON content."""
    config = parse(ManyConfig, argv, prog="python -m benchmarks.many_adapters", description=__doc__.split("\n")[0])
    rows = [row for method in config.methods for row in method_rows(method, config)]
    memory = {method: bytes_per_adapter(method) for method in config.methods}
    out = {"machine": host_info(), "config": dataclasses.asdict(config) | {"json": str(config.json)}, "rows": rows}
    out["memory"] = memory
    print(markdown(rows, memory, config))
    if config.json:
        config.json.write_text(json.dumps(out, indent=2) + "\n")
        log(f"wrote {config.json}")
    return out


if __name__ == "__main__":
    main()
