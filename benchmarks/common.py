"""What the benchmarks share: the models, batches, method set-up and host facts.

The benchmarks time, count and compare the methods on randomly initialised models of RoBERTa-base's and
ViT-base's shapes (:func:`build_model`), with the papers' adapter settings (:func:`adapter_config`), set
up by the training programs' own :func:`train.methods.build_method` (:func:`method_parts`).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cdvft_jax
from cdvft_jax.params import Params
from cdvft_jax.training import LossFn
from train.methods import Batch, build_method, head_predicate, make_loss

MODELS = ("roberta-base", "vit-base")
BASELINE_METHODS = ("full", "head", "floor")
ADAPTER_METHODS = cdvft_jax.method_names()
METHODS = BASELINE_METHODS + ADAPTER_METHODS
SEED = 0
LEARNING_RATE = 1e-5  # plain AdamW of full / head / floor
ADAPTER_LEARNING_RATE = 5e-2
HEAD_LEARNING_RATE = 5e-3
WEIGHT_DECAY = 0.01  # the same for every method, so every optimizer does the same work per leaf
VIT_LABELS = 10
REPO_ROOT = Path(__file__).resolve().parents[1]
HEAD_MODULES = ("classifier",)
# The leaf that ``floor`` trains besides the head: the earliest one in the network.
FLOOR_LEAVES = {
    "roberta-base": "roberta/embeddings/LayerNorm/",
    "vit-base": "vit/embeddings/position_embeddings",
}


def adapter_config(method: str, model: str) -> cdvft_jax.AdapterConfig:
    """The config of adapter ``method`` for ``model`` at the papers' settings (``MethodSpec.paper_settings``:
    e.g. LoRA r=8 on RoBERTa-base, r=16 on ViT-base, with alpha = r; each method states its own), query and
    value of every layer adapted, the classifier trained in full."""
    spec = cdvft_jax.method_spec(method)
    return spec.config_class(
        target_modules=("query", "value"), modules_to_save=list(HEAD_MODULES), **spec.paper_settings[model]
    )


def log(message: str) -> None:
    """Progress line on stderr (stdout carries only the results)."""
    print(message, file=sys.stderr, flush=True)


def model_config(small: bool, model: str = "roberta-base", layers: int | None = None) -> Any:
    """The model's base shape (Hugging Face config defaults), or a tiny one for smoke runs.

    ``layers`` overrides the number of encoder layers (``--quick`` runs a truncated model).
    """
    from transformers import RobertaConfig, ViTConfig

    tiny = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    overrides = {"num_hidden_layers": layers} if layers else {}
    if model == "roberta-base":
        shape = {"vocab_size": 1000, **tiny} if small else {}
        return RobertaConfig(num_labels=2, **{**shape, **overrides})
    if model == "vit-base":
        shape = {"image_size": 32, "patch_size": 8, **tiny} if small else {}
        return ViTConfig(num_labels=VIT_LABELS, **{**shape, **overrides})
    raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")


def model_class(model: str) -> type:
    from transformers import FlaxRobertaForSequenceClassification, FlaxViTForImageClassification

    return FlaxViTForImageClassification if model == "vit-base" else FlaxRobertaForSequenceClassification


def build_model(small: bool, model: str = "roberta-base", layers: int | None = None, do_init: bool = True) -> Any:
    """A randomly initialised model, seed :data:`SEED`; ``do_init=False`` allocates no params."""
    return model_class(model)(model_config(small, model, layers), seed=SEED, _do_init=do_init)


def make_batch(vocab_size: int, batch: int, seq_len: int) -> Batch:
    """Random token ids (no special tokens), a full attention mask, random binary labels, unit weights."""
    rng = np.random.default_rng(SEED)
    # ids 0..2 are <s>, <pad>, </s>; RoBERTa's position ids treat <pad> specially.
    input_ids = rng.integers(3, vocab_size, size=(batch, seq_len), dtype=np.int32)
    labels = rng.integers(0, 2, size=(batch,), dtype=np.int32)
    inputs = {"input_ids": jnp.asarray(input_ids), "attention_mask": jnp.ones((batch, seq_len), jnp.int32)}
    return Batch(inputs, jnp.asarray(labels), jnp.ones((batch,), jnp.float32))


def make_image_batch(config: Any, batch: int) -> Batch:
    """Random ``(batch, channels, size, size)`` normal pixels, random labels, unit weights."""
    rng = np.random.default_rng(SEED)
    shape = (batch, config.num_channels, config.image_size, config.image_size)
    return Batch(
        {"pixel_values": jnp.asarray(rng.standard_normal(shape, dtype=np.float32))},
        jnp.asarray(rng.integers(0, config.num_labels, size=(batch,), dtype=np.int32)),
        jnp.ones((batch,), jnp.float32),
    )


def make_inputs(model: Any, kind: str, batch: int, seq_len: int) -> Batch:
    """The benchmark batch of ``kind``; ``seq_len`` applies to text only."""
    if kind == "vit-base":
        return make_image_batch(model.config, batch)
    return make_batch(model.config.vocab_size, batch, seq_len)


def tokens_per_example(config: Any, kind: str, seq_len: int) -> int:
    """Sequence length the encoder sees: ``seq_len`` for text, patches + [CLS] for ViT."""
    if kind == "vit-base":
        return (config.image_size // config.patch_size) ** 2 + 1
    return seq_len


def trainable_predicate(method: str, kind: str) -> Callable[[str], bool]:
    """Which leaves train, by ``/``-joined path, for the methods that are not adapters."""
    if method == "full":
        return lambda path: True
    in_head = head_predicate(HEAD_MODULES)
    if method == "head":
        return in_head
    if method == "floor":
        return lambda path: in_head(path) or path.startswith(FLOOR_LEAVES[kind])
    raise ValueError(f"{method!r} is not one of {', '.join(BASELINE_METHODS)}")


def xla_flops(compiled: Any) -> float | None:
    """``cost_analysis()["flops"]`` of a compiled executable (a dict, or a list of them in older jax)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return None if flops is None else float(flops)


class MethodParts(NamedTuple):
    """What a method trains and how: the split of the shared model's params, its optimizer and loss."""

    trainable: Params
    frozen: Params
    optimizer: optax.GradientTransformation
    loss_fn: LossFn


def method_parts(name: str, model: Any, kind: str = "roberta-base") -> MethodParts:
    """Splits the shared model's params for ``name`` and builds its optimizer and loss (dropout off), by
    the programs' own :func:`train.methods.build_method`."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    adapter = name in ADAPTER_METHODS
    setup = build_method(
        name,
        model,
        config=adapter_config(name, kind) if adapter else None,
        head_modules=HEAD_MODULES,
        # The plain methods train every leaf at one small rate, so no step diverges.
        learning_rate=ADAPTER_LEARNING_RATE if adapter else LEARNING_RATE,
        head_learning_rate=HEAD_LEARNING_RATE if adapter else LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        seed=SEED,
        trains=None if adapter else trainable_predicate(name, kind),
    )
    return MethodParts(setup.trainable, setup.frozen, setup.optimizer, make_loss(setup.apply, dropout=False))


def cpu_model() -> str:
    """``lscpu``'s model name where available, else ``platform.processor()`` or the machine type."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def host_info() -> dict[str, Any]:
    """Where the benchmark ran: CPU, cores, software versions, backend and the date."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = jax.devices()[0]
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
