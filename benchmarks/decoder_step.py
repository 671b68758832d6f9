"""Train-step time and peak memory of adapters on every linear layer of a Llama-shaped decoder.

What is measured
----------------
One jitted training step (forward, backward, AdamW) of a randomly initialised ``FlaxLlamaForCausalLM``
with the real widths of a 1B-class Llama (TinyLlama-1.1B's config: hidden 2048, MLP 5632, 32 query and
4 key-value heads, vocabulary 32,000) but few layers (``--layers``, 2 by default) so that it fits a CPU,
on a fixed random batch of next-token prediction (mean causal-LM cross-entropy).  Methods:

* ``floor``: only the first layer's input RMSNorm trains.  The gradient travels back through every
  layer, but no weight gradient of a linear layer is computed: no adapter on every layer can be cheaper;
* ``cdvft``: CDVFT on ``target_modules="all-linear"`` (q, k, v, o, gate, up, down of every layer), its
  default block sizes;
* ``lora8`` / ``lora16``: LoRA r=8 / r=16 (alpha = r) on the same layers.

``--dtype bfloat16`` runs the model in bfloat16 with the frozen base params stored in bfloat16 and the
trainable leaves in float32 (the adapters' deltas are computed in float32).  Same protocol as
:mod:`benchmarks.step_time`: one model and batch shared by every method, ahead-of-time compilation,
warm-up, then ``--repeats`` interleaved rounds with the order rotated each round, medians reported, and
each method's peak RSS measured in a fresh subprocess.

Goal (issue 13): CDVFT all-linear at most 1.15x the floor and no slower than LoRA r=16 in the same run.

    python -m benchmarks.decoder_step --json benchmarks/decoder_step_cpu.json
    python -m benchmarks.decoder_step --dtype bfloat16 --repeats 5
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cdvft_jax
from benchmarks.common import SEED, WEIGHT_DECAY, host_info, log
from benchmarks.step_time import (
    MethodRun,
    Timing,
    markdown,
    peak_rss_in_subprocess,
    peak_rss_mb,
    summarize,
    time_methods,
)
from cdvft_jax.params import Params, split_params
from train.cli import Names, check_count, check_names, parse

METHODS = ("floor", "cdvft", "lora8", "lora16")
TINYLLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)
"""TinyLlama-1.1B's widths (its Hugging Face config); the number of layers is the benchmark's."""
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_attention_heads=8, num_key_value_heads=2)
FLOOR_LEAF = "model/layers/0/input_layernorm/"
LEARNING_RATE = 1e-3  # any stable rate: the step's work does not depend on it
ADAPTERS = {
    "cdvft": ("cdvft", {}),
    "lora8": ("lora", {"rank": 8, "alpha": 8.0}),
    "lora16": ("lora", {"rank": 16, "alpha": 16.0}),
}


def build_decoder(config: DecoderStepConfig) -> Any:
    """The randomly initialised Llama-shaped model, its params in ``config.dtype``."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    widths = SMALL if config.small else TINYLLAMA_1B
    dtype = jnp.dtype(config.dtype)
    model = FlaxLlamaForCausalLM(
        LlamaConfig(**widths, num_hidden_layers=config.layers), seed=SEED, dtype=dtype, _do_init=True
    )
    if dtype != jnp.float32:
        model.params = jax.tree.map(lambda leaf: leaf.astype(dtype), model.params)
    return model


def token_batch(vocab_size: int, batch: int, seq_len: int) -> dict[str, jax.Array]:
    """Random token ids and a full attention mask."""
    ids = np.random.default_rng(SEED).integers(0, vocab_size, (batch, seq_len), dtype=np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((batch, seq_len), jnp.int32)}


def causal_lm_loss(apply: Any) -> Any:
    """``loss_fn(params, batch, rng)``: mean next-token cross-entropy, computed in float32."""

    def loss_fn(params: Params, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
        del rng  # no dropout
        logits = apply(batch["input_ids"], attention_mask=batch["attention_mask"], params=params).logits
        targets = batch["input_ids"][:, 1:]
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets).mean()

    return loss_fn


def setup_decoder_method(name: str, model: Any) -> MethodRun:
    """The :class:`~benchmarks.step_time.MethodRun` of ``name`` on the shared decoder."""
    if name == "floor":
        trainable, frozen = split_params(model.params, lambda path: path.startswith(FLOOR_LEAF))
        trainable = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), trainable)
        optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        apply = model.__call__
    else:
        method, settings = ADAPTERS[name]
        config = cdvft_jax.method_spec(method).config_class(target_modules=cdvft_jax.ALL_LINEAR, **settings)
        adapted = cdvft_jax.inject(model, config)
        trainable, frozen = adapted.split(adapted.init(jax.random.key(SEED), model.params))
        optimizer = cdvft_jax.adapter_optimizer(adapted, adapter_learning_rate=LEARNING_RATE, weight_decay=0.0)
        apply = adapted
    loss_fn = causal_lm_loss(apply)
    return MethodRun(
        name=name,
        step=cdvft_jax.make_train_step(loss_fn, optimizer),
        state=cdvft_jax.init_train_state(trainable, optimizer),
        frozen=frozen,
        trainable_params=cdvft_jax.count_params(trainable),
    )


def rss_only(config: DecoderStepConfig) -> None:
    """Child mode: build and step one method; print its peak RSS in MiB."""
    model = build_decoder(config)
    batch = token_batch(model.config.vocab_size, config.batch, config.seq_len)
    run = setup_decoder_method(config.rss_only, model)
    for _ in range(config.rss_steps):
        run.run_step(batch, jax.random.key(SEED))
    print(f"{peak_rss_mb():.1f}")


def measure_rss(name: str, config: DecoderStepConfig) -> float:
    """Peak RSS of ``name`` measured in a fresh subprocess."""
    flags = ["--rss-only", name, "--dtype", config.dtype, "--layers", str(config.layers)]
    flags += ["--batch", str(config.batch), "--seq-len", str(config.seq_len), "--rss-steps", str(config.rss_steps)]
    if config.small:
        flags.append("--small")
    log(f"peak RSS of {name} (subprocess)")
    return peak_rss_in_subprocess("benchmarks.decoder_step", flags)


def run_benchmark(config: DecoderStepConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Times every method (interleaved), then their peak RSS; ``(machine, results)``."""
    label = "llama-small-smoke" if config.small else "tinyllama-1.1b-shaped"
    machine = {
        **host_info(),
        "model": f"{label} ({config.layers} layers, {config.dtype})",
        "batch": config.batch,
        "seq_len": config.seq_len,
        "repeats": config.repeats,
        "dtype": config.dtype,
    }
    log(f"building the {machine['model']} model")
    model = build_decoder(config)
    batch = token_batch(model.config.vocab_size, config.batch, config.seq_len)
    runs = [setup_decoder_method(name, model) for name in config.methods]
    time_methods(runs, batch, config.repeats, config.warmup)
    timings = [Timing(run.name, run.trainable_params, run.times_s, run.flops) for run in runs]
    del runs, model, batch
    rss = {name: measure_rss(name, config) for name in config.methods} if config.rss else {}
    results = summarize(timings, rss, config.batch * config.seq_len)
    lora16 = next((r["ms_per_step"] for r in results if r["method"] == "lora16"), None)
    for row in results:
        row["ratio_to_lora16"] = None if lora16 is None else row["ms_per_step"] / lora16
    return machine, results


@dataclasses.dataclass(frozen=True)
class DecoderStepConfig:
    """Train-step time and peak RSS of CDVFT and LoRA on every linear layer of a Llama-shaped decoder.

    Attributes:
      methods: the methods timed, out of floor, cdvft, lora8 and lora16.
      dtype: the base model's params and compute dtype (trainable leaves stay float32).
      layers: decoder layers (the widths are TinyLlama-1.1B's).
      batch: sequences per batch.
      seq_len: tokens per sequence.
      repeats: interleaved timing rounds.
      warmup: untimed steps after compiling.
      rss: measure each method's peak RSS in a fresh subprocess.
      rss_steps: steps each RSS subprocess runs.
      small: a tiny model, for a smoke run.
      json: also write the results here as JSON.
      rss_only: (internal: what an RSS subprocess runs) build and step only this method, here.
    """

    methods: Names = METHODS
    dtype: Literal["float32", "bfloat16"] = "float32"
    layers: int = 2
    batch: int = 2
    seq_len: int = 128
    repeats: int = 5
    warmup: int = 2
    rss: bool = True
    rss_steps: int = 2
    small: bool = False
    json: Path | None = None
    rss_only: str | None = None

    def __post_init__(self) -> None:
        check_names(self.methods, "methods", METHODS)
        for name in ("layers", "batch", "repeats", "rss_steps"):
            check_count(getattr(self, name), name)
        check_count(self.seq_len, "seq_len", low=2)  # at least one next-token target
        check_count(self.warmup, "warmup", low=0)
        if self.rss_only is not None:
            check_names((self.rss_only,), "rss_only", METHODS)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse(
        DecoderStepConfig,
        argv,
        prog="python -m benchmarks.decoder_step",
        description=DecoderStepConfig.__doc__.split("\n")[0],
    )
    if config.rss_only:
        rss_only(config)
        return
    machine, results = run_benchmark(config)
    print(markdown(results, machine))
    if config.json:
        config.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
        log(f"wrote {config.json}")


if __name__ == "__main__":
    main()
