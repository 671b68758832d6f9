"""Batch inference with many adapters of one base model: every batch mixes adapters, one forward pass each.

Running it
----------
::

    python -m train.infer --model BASE --adapters out/sst2/adapter out/tweets/adapter \\
        --num-labels 2 --input rows.jsonl --output predictions.jsonl

Each input row is a JSON object: ``"adapter"`` names the adapter that scores it (a folder's name, or the
``NAME`` of ``NAME=FOLDER``; absent or null: the base model with the first adapter's head) and the
example is ``"text"`` (with an optional ``"text_pair"``) for a text model or ``"image"`` (a file path) for
an image model.  Each output row (same order) holds ``"row"``, ``"adapter"`` and, for a classifier, the
``"label"`` index with the softmax ``"scores"``, or the ``"score"`` of a one-output (regression) head.
Image paths are relative to the input file's folder.

Every adapter is loaded and checked (:func:`cdvft_jax.load_adapter`) and every row read before anything
runs; adapters that differ in method, targets, sizes or head are refused (:func:`cdvft_jax.adapter_difference`)
and so is a row naming an unknown adapter.  The adapters are stacked (:func:`cdvft_jax.stack_adapters`)
and the rows run in their input order, ``--batch-size`` at a time, each batch mixing adapters freely.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import cdvft_jax
from cdvft_jax.export import load_base_model
from train.cli import ConfigError, check_count, parse


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferConfig:
    """Predictions of many adapters of one base model, in mixed batches.

    Attributes:
      model: the base model's folder (or hub name) the adapters were trained on.
      adapters: the adapter folders (a program's OUTPUT_DIR/adapter); a row names one by the folder's
        name, or by NAME when given as NAME=FOLDER.
      input: JSONL, one example per line ("adapter", and "text" [+ "text_pair"] or "image").
      output: JSONL written here, one prediction per input row, in the input's order.
      num_labels: the classifier size the adapters were trained with.
      batch_size: rows per forward pass (whatever their adapters).
      max_length: tokens kept per text row.
    """

    model: str
    adapters: tuple[str, ...]
    input: Path
    output: Path
    num_labels: int
    batch_size: int = 64
    max_length: int = 128

    def __post_init__(self) -> None:
        check_count(self.num_labels, "num_labels")
        check_count(self.batch_size, "batch_size")
        check_count(self.max_length, "max_length", low=2)
        if not self.adapters:
            raise ConfigError("--adapters needs at least one adapter folder")
        names = [name for name, _ in self.adapter_folders()]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"--adapters names {', '.join(repeated)} twice; give them as NAME=FOLDER")

    def adapter_folders(self) -> list[tuple[str, Path]]:
        """``(name, folder)`` of each adapter, in the order given."""
        pairs = []
        for item in self.adapters:
            name, sep, folder = item.partition("=")
            path = Path(folder) if sep else Path(item)
            pairs.append((name if sep else path.name, path))
        return pairs


def read_rows(path: Path, names: Sequence[str], image_model: bool) -> list[dict[str, Any]]:
    """The input rows, each checked: JSON, an adapter among ``names`` (or none), the model's input field.

    Raises:
      SystemExit: naming the line of the first bad row.
    """
    if not path.is_file():
        raise SystemExit(f"--input {path} is not a file")
    rows = []
    field = "image" if image_model else "text"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{number}: not a JSON object ({e})") from e
        if not isinstance(row, dict):
            raise SystemExit(f"{path}:{number}: not a JSON object")
        adapter = row.get("adapter")
        if adapter is not None and adapter not in names:
            raise SystemExit(f"{path}:{number}: adapter {adapter!r} is not among --adapters ({', '.join(names)})")
        if not isinstance(row.get(field), str):
            kind = "an image" if image_model else "a text"
            raise SystemExit(f"{path}:{number}: {kind} model needs a string {field!r}")
        if "text_pair" in row and not isinstance(row["text_pair"], str):
            raise SystemExit(f"{path}:{number}: 'text_pair' must be a string")
        if image_model:  # relative to the input file's folder, and there before anything runs
            image = path.parent / row["image"]
            if not image.is_file():
                raise SystemExit(f"{path}:{number}: image {image} is not a file")
            row = {**row, "image": str(image)}
        rows.append(row)
    if not rows:
        raise SystemExit(f"--input {path} holds no rows")
    return rows


def load_stack(config: InferConfig) -> tuple[Any, cdvft_jax.AdaptedModel, dict, list[str]]:
    """The base model, the first adapter's adapted model, the stacked params and the adapter names.

    Raises:
      SystemExit: an adapter that does not load, or differs from the first one.
    """
    named = dict(config.adapter_folders())
    first = cdvft_jax.read_adapter_config(config.adapter_folders()[0][1])
    model = load_base_model(config.model, first["base_model_class"], config.num_labels, from_pt=False)
    loaded = []
    for name, folder in named.items():
        try:
            loaded.append(cdvft_jax.load_adapter(folder, model))
        except (OSError, ValueError) as e:
            raise SystemExit(f"adapter {name!r} ({folder}): {e}") from e
    adapted = loaded[0][0]
    for (name, folder), (other, _) in zip(named.items(), loaded, strict=True):
        difference = cdvft_jax.adapter_difference(adapted, other)
        if difference is not None:
            raise SystemExit(f"adapter {name!r} ({folder}) cannot share a batch with the first one: {difference}")
    trainables = [adapted.split(params)[0] for _, params in loaded]
    frozen = adapted.split(loaded[0][1])[1]
    return model, adapted, cdvft_jax.merge_params(cdvft_jax.stack_adapters(adapted, trainables), frozen), list(named)


def batch_inputs(
    model: Any, rows: Sequence[dict], config: InferConfig, tokenizer: Any = None, statistics: Any = None
) -> dict[str, Any]:
    """The model inputs of ``rows``, padded to ``config.batch_size`` rows (and ``max_length`` tokens), so
    every batch has one shape and compiles once; an image model needs its ``(mean, std)`` ``statistics``."""
    pad = config.batch_size - len(rows)
    if tokenizer is None:
        from PIL import Image

        from train.image import center_crop, to_pixels

        size = model.config.image_size
        crops = [center_crop(Image.open(row["image"]).convert("RGB"), size) for row in rows]
        pixels = to_pixels(crops, *statistics)
        return {"pixel_values": np.concatenate([pixels, np.zeros((pad, *pixels.shape[1:]), np.float32)])}
    encoded = [
        tokenizer(
            row["text"], row.get("text_pair"), truncation=True, max_length=config.max_length, padding="max_length"
        )
        for row in rows
    ]
    inputs = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in encoded[0]:
            values = np.asarray([e[key] for e in encoded], np.int32)
            inputs[key] = np.concatenate([values, np.zeros((pad, values.shape[1]), np.int32)])
    return inputs


def predictions(logits: np.ndarray) -> Iterator[dict[str, Any]]:
    """One output record per row of ``logits``: the label and softmax scores, or a regression score."""
    if logits.shape[-1] == 1:
        for value in logits[:, 0]:
            yield {"score": float(value)}
        return
    scores = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    for row in scores:
        yield {"label": int(np.argmax(row)), "scores": [float(s) for s in row]}


def run(config: InferConfig) -> int:
    """Writes ``config.output``; returns the number of rows scored."""
    model, adapted, params, names = load_stack(config)
    image_model = model.main_input_name == "pixel_values"
    rows = read_rows(config.input, names, image_model)
    tokenizer = statistics = None
    if image_model:
        from train.image import normalisation

        statistics = normalisation(config.model)
    else:
        from transformers import AutoTokenizer

        from train.text import check_model_fits

        tokenizer = AutoTokenizer.from_pretrained(config.model)
        check_model_fits(model.config, tokenizer, config.max_length)
    index = {name: number for number, name in enumerate(names)}

    @jax.jit
    def forward(params, inputs, ids):
        return adapted(**inputs, params=params, adapter_ids=ids).logits

    config.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = config.output.with_name(config.output.name + ".tmp")
    try:  # a run cut short leaves no predictions file, partial or temporary
        with temporary.open("w", encoding="utf-8") as out:
            for start in tqdm(range(0, len(rows), config.batch_size), desc="batches", unit="batch"):
                chunk = rows[start : start + config.batch_size]
                ids = [index.get(row.get("adapter"), -1) for row in chunk]
                ids += [-1] * (config.batch_size - len(chunk))  # padding rows: the base model, dropped below
                inputs = batch_inputs(model, chunk, config, tokenizer, statistics)
                logits = np.asarray(forward(params, inputs, jnp.asarray(ids)))
                for offset, (row, record) in enumerate(zip(chunk, predictions(logits[: len(chunk)]), strict=True)):
                    out.write(json.dumps({"row": start + offset, "adapter": row.get("adapter"), **record}) + "\n")
        temporary.replace(config.output)
    finally:
        temporary.unlink(missing_ok=True)
    return len(rows)


def parse_args(argv: Sequence[str] | None = None) -> InferConfig:
    """The command line of ``python -m train.infer``."""
    return parse(InferConfig, argv, prog="python -m train.infer", description=InferConfig.__doc__.split("\n")[0])


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m train.infer``."""
    config = parse_args(argv)
    count = run(config)
    print(f"wrote {count:,} predictions of {len(config.adapters)} adapters to {config.output}")


if __name__ == "__main__":
    main()
