"""Trainable-parameter counts of every method on RoBERTa-base and ViT-base, and of CDVFT and LoRA on every
linear layer of Llama-2-7B, without allocating them.

The base params come from ``jax.eval_shape`` of the model's ``init_weights`` and
the adapters from ``jax.eval_shape`` of :meth:`cdvft_jax.AdaptedModel.init`, so
nothing model-sized is allocated.  Counts are split into the adapter itself and
the trained head (``modules_to_save``: the classifier); ``analytic_adapter_params``
is the sum over adapted layers of the method's own ``num_params`` formula and must
equal the counted ``adapter_params``.  ``adapter_ratio_to_cdvft`` is a method's
adapter-only count over CDVFT's on the same model: LoRA r=8 on RoBERTa-base gives
294,912 / 55,296 = 5.33 and LoRA r=16 on ViT-base 589,824 / 55,296 = 10.67.

:func:`llama_param_rows` counts ``target_modules="all-linear"`` (q, k, v, o, gate, up, down of every layer)
on Llama-2-7B's shapes (hidden 4096, MLP 11008, 32 layers), with CDVFT's default block size
(one block for the square attention layers; for the MLP's ``4096 <-> 11008``, blocks of 4096 with the
11008 side padded to three of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

import cdvft_jax
from benchmarks.common import (
    ADAPTER_METHODS,
    SEED,
    adapter_config,
    build_model,
    trainable_predicate,
)


def abstract_model(kind: str, small: bool = False, layers: int | None = None) -> tuple[Any, Any]:
    """``(model without params, its params as a tree of ShapeDtypeStruct)``."""
    model = build_model(small, kind, layers, do_init=False)
    shapes = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(SEED), model.input_shape))
    return model, shapes


def abstract_adapted(method: str, kind: str, model: Any, base_shapes: Any) -> tuple[cdvft_jax.AdaptedModel, Any]:
    """``(AdaptedModel, base + adapter params as ShapeDtypeStructs)`` of adapter ``method``."""
    adapted = cdvft_jax.inject(model, adapter_config(method, kind))
    shapes = jax.eval_shape(lambda base: adapted.init(jax.random.key(SEED), base), base_shapes)
    return adapted, shapes


def analytic_adapter_params(adapted: cdvft_jax.AdaptedModel) -> int:
    """Sum over the adapted layers of the method's per-layer trainable count."""
    return sum(
        adapted.method.num_params(layer.d_in, layer.d_out, layer.config, path) for path, layer in adapted.layers.items()
    )


def param_rows(
    kind: str, methods: Sequence[str], small: bool = False, layers: int | None = None
) -> list[dict[str, Any]]:
    """One row per method: trainable, adapter-only and head counts, and the ratio to CDVFT's adapter."""
    model, base = abstract_model(kind, small, layers)
    total = cdvft_jax.count_params(base)
    rows = []
    for method in methods:
        if method in ADAPTER_METHODS:
            adapted, shapes = abstract_adapted(method, kind, model, base)
            summary = adapted.summary(shapes)
            row = {
                "trainable_params": summary.trainable,
                "adapter_params": summary.adapter,
                "head_params": summary.modules_to_save,
                "analytic_adapter_params": analytic_adapter_params(adapted),
                "adapted_layers": len(adapted.layers),
            }
        else:
            trainable, _ = cdvft_jax.split_params(base, trainable_predicate(method, kind))
            head, _ = cdvft_jax.split_params(trainable, lambda path: path.startswith("classifier/"))
            row = {
                "trainable_params": cdvft_jax.count_params(trainable),
                "adapter_params": 0,
                "head_params": cdvft_jax.count_params(head),
                "analytic_adapter_params": 0,
                "adapted_layers": 0,
            }
        rows.append({"model": kind, "method": method, **row, "base_params": total})
    cdvft = next((r["adapter_params"] for r in rows if r["method"] == "cdvft"), None)
    for row in rows:
        adapter = row["adapter_params"]
        row["adapter_ratio_to_cdvft"] = adapter / cdvft if cdvft and adapter else None
    return rows


LLAMA_2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
"""Llama-2-7B's shapes (its Hugging Face config)."""

LLAMA_METHODS = (("cdvft", {}), ("lora", {"rank": 8, "alpha": 8.0}), ("lora", {"rank": 16, "alpha": 16.0}))


def llama_param_rows(config: dict[str, Any] = LLAMA_2_7B) -> list[dict[str, Any]]:
    """CDVFT and LoRA r=8 / r=16 with ``target_modules="all-linear"`` on a Llama config, counted on abstract
    shapes; one row per method with the adapted layers and the ratio of LoRA's count to CDVFT's."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    model = FlaxLlamaForCausalLM(LlamaConfig(**config), _do_init=False)
    base = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(SEED), model.input_shape))
    rows = []
    for method, settings in LLAMA_METHODS:
        config_class = cdvft_jax.method_spec(method).config_class
        adapted = cdvft_jax.inject(model, config_class(target_modules=cdvft_jax.ALL_LINEAR, **settings))
        shapes = jax.eval_shape(adapted.init_adapter, jax.random.key(SEED))
        label = method + (f" r={settings['rank']}" if "rank" in settings else "")
        rows.append(
            {
                "model": "llama-2-7b",
                "method": label,
                "adapter_params": cdvft_jax.count_params(shapes),
                "analytic_adapter_params": analytic_adapter_params(adapted),
                "adapted_layers": len(adapted.layers),
                "base_params": cdvft_jax.count_params(base),
            }
        )
    for row in rows:
        row["adapter_ratio_to_cdvft"] = row["adapter_params"] / rows[0]["adapter_params"]
    return rows


def llama_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The Llama-2-7B all-linear table."""
    lines = [
        "Adapter parameters, every linear layer of Llama-2-7B (counted on abstract shapes)",
        "",
        "| method | adapted layers | adapter params | % of the base | / CDVFT |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = 100 * r["adapter_params"] / r["base_params"]
        lines.append(
            f"| {r['method']} | {r['adapted_layers']} | {r['adapter_params']:,} | {share:.3f}% "
            f"| {r['adapter_ratio_to_cdvft']:.2f}x |"
        )
    return "\n".join(lines)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The params table (all models)."""
    lines = [
        "Trainable parameters (counted on abstract shapes; head = the classifier, trained in full)",
        "",
        "| model | method | trainable (adapter + head) | adapter only | analytic adapter | adapter / CDVFT |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "-" if r["adapter_ratio_to_cdvft"] is None else f"{r['adapter_ratio_to_cdvft']:.2f}x"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['trainable_params']:,} | {r['adapter_params']:,} "
            f"| {r['analytic_adapter_params']:,} | {ratio} |"
        )
    return "\n".join(lines)
