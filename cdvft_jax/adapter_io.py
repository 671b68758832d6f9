"""Saving an adapter to a directory and loading it back onto a fresh base model.

An adapter directory holds two files:

* ``adapter_config.json``: the format version, the adapter config
  (:meth:`~cdvft_jax.config.AdapterConfig.to_dict`), the base model's name and
  class, and the shape of every adapted layer and ``modules_to_save`` leaf, so
  an adapter for another architecture is refused before anything is read;
  It also holds ``weights_sha256``, the SHA-256 of the tensor file, checked on load, so flipped bytes
  in the tensor data (which the safetensors header cannot see) are refused;
* ``adapter_model.safetensors``: every trainable leaf (the adapter leaves and
  the ``modules_to_save`` leaves) in float32 (a method's frozen adapter leaves,
  such as VeRA's projections, are rebuilt from the config instead), keyed by its ``/``-joined
  parameter path, e.g. ``roberta/encoder/layer/0/attention/self/query/cdv_a_in``.
  The frozen base weights are never stored.

Example::

    adapted = cdvft_jax.inject(model, CDVFTConfig(modules_to_save=["classifier"]))
    params = adapted.init(jax.random.key(0), model.params)
    ...  # train
    save_adapter("out/sst2", adapted, params, base_model="roberta-base")

    model = FlaxRobertaForSequenceClassification.from_pretrained("roberta-base")
    adapted, params = load_adapter("out/sst2", model)
    logits = adapted(input_ids, params=params).logits
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from cdvft_jax._version import __version__
from cdvft_jax.config import config_from_dict
from cdvft_jax.injection import AdaptedModel, inject
from cdvft_jax.params import Params, check_finite, flat_params, non_finite_leaves, unflat_params

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "AdapterFileError",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
]

FORMAT_VERSION = 2
"""The newest adapter directory format this library writes and reads (2 adds ``weights_sha256``)."""

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_LIBRARY = "cdvft_jax"
_REQUIRED_KEYS = (
    "format_version",
    "library",
    "library_version",
    "adapter",
    "base_model",
    "base_model_class",
    "layers",
    "modules_to_save",
)
_SHOWN = 8  # keys listed in an error message before "... and N more"

Shape = tuple[int, ...]


class AdapterFileError(ValueError):
    """An adapter directory is missing, unreadable, corrupt, or made for another model."""


class AdapterWriteError(OSError):
    """An adapter could not be written (a full disk, say); the message says whether an older one stays."""


# --- saving -------------------------------------------------------------------------------------


def save_adapter(
    directory: str | os.PathLike,
    adapted: AdaptedModel,
    params: Params,
    *,
    base_model: str | None = None,
) -> Path:
    """Writes the trainable leaves of ``params`` and their description to ``directory``.

    Only the adapter leaves and the ``modules_to_save`` leaves are stored (as
    float32); the frozen base weights are not, so the files stay small
    (RoBERTa-base with query/value adapted: 55,296 adapter scalars plus the
    head).  ``params`` may be the full tree or just the trainable part
    (``adapted.split(params)[0]``).

    The files are written under temporary names and renamed into place, the
    config last, after any older config has been removed: a save that fails
    or is killed part-way leaves either the older adapter untouched or a
    directory without ``adapter_config.json``, never a mix that loads.
    Other files in ``directory`` are left alone.

    Args:
      directory: where to write; created if needed.
      adapted: the adapted model the params belong to.
      params: params holding every adapter and ``modules_to_save`` leaf.
      base_model: name or path of the base checkpoint, recorded for the reader.

    Returns:
      ``directory`` as a :class:`~pathlib.Path`.

    Raises:
      ValueError: if ``params`` lacks a trainable leaf or has one of the wrong shape.
      NonFiniteError: if a trainable leaf holds a NaN or an infinity (nothing is written).
      AdapterWriteError: if a file cannot be written (a full disk, say); an older adapter in
        ``directory`` stays loadable unless the save had already removed its config.

    Example::

        save_adapter("out/sst2", adapted, params, base_model="roberta-base")
    """
    directory = Path(directory)
    expected = adapted.trainable_shapes()
    trainable = {path: leaf for path, leaf in flat_params(params).items() if adapted.is_trainable(path)}
    missing = sorted(set(expected) - set(trainable))
    if missing:
        raise ValueError(
            f"params lack {len(missing)} trainable leaves, e.g. {_listing(missing)}; "
            "build them with AdaptedModel.init(key, base_params) or load_adapter"
        )
    for path, leaf in trainable.items():
        if tuple(leaf.shape) != expected[path]:
            raise ValueError(f"params leaf {path!r} has shape {tuple(leaf.shape)}, the model expects {expected[path]}")
    tensors = {path: np.ascontiguousarray(leaf, dtype=np.float32) for path, leaf in trainable.items()}
    check_finite(tensors, "the adapter to save")
    weights = safetensors.numpy.save(tensors, metadata={"format": _LIBRARY})
    document = {
        "format_version": FORMAT_VERSION,
        "library": _LIBRARY,
        "library_version": __version__,
        "adapter": adapted.config.to_dict(),
        "base_model": base_model,
        "base_model_class": adapted.model_class,
        "layers": _layer_entries(adapted),
        "modules_to_save": {path: list(shape) for path, shape in _saved_module_shapes(adapted).items()},
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    # Serialised before the disk is touched, so a config that is not JSON-ready fails cleanly.
    text = json.dumps(document, indent=2) + "\n"

    tag = uuid.uuid4().hex
    weights_tmp = directory / f".{WEIGHTS_NAME}.{tag}.tmp"
    config_tmp = directory / f".{CONFIG_NAME}.{tag}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_durably(weights_tmp, weights)
        os.chmod(weights_tmp, SHARED_FILE_MODE)
        _write_durably(config_tmp, text.encode("utf-8"))
        # An older config beside the new weights could still load (same shapes,
        # wrong alpha or head), so it goes before the weights are swapped in.
        (directory / CONFIG_NAME).unlink(missing_ok=True)
        _fsync_dir(directory)
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        os.replace(config_tmp, directory / CONFIG_NAME)
        _fsync_dir(directory)
    except OSError as e:
        kept = (
            "the adapter saved there before stays loadable"
            if (directory / CONFIG_NAME).is_file()
            else "the folder holds no loadable adapter"
        )
        raise AdapterWriteError(
            f"could not write the adapter in {directory}: {e}; {kept}. Free space (or fix the folder) and save again."
        ) from e
    finally:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
    return directory


SHARED_FILE_MODE = 0o644
"""Mode of written weight files: safetensors creates them 0600, but adapters and exports are made to share."""


def _write_durably(path: Path, data: bytes) -> None:
    """Writes ``data`` to a new file at ``path`` and flushes it to the disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    # Makes the renames durable across a power loss; directories cannot be opened on Windows.
    if os.name == "posix":
        _fsync_file(directory)


# --- loading ------------------------------------------------------------------------------------


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates ``adapter_config.json`` of an adapter directory.

    For tools that inspect adapters without a model: the result has the keys
    ``format_version``, ``library``, ``library_version``, ``adapter`` (the
    :meth:`~cdvft_jax.config.AdapterConfig.to_dict` form), ``base_model``,
    ``base_model_class``, ``layers`` (``{module path: {"d_in", "d_out",
    "params": {leaf: shape}}}``) and ``modules_to_save`` (``{param path: shape}``).

    Raises:
      AdapterFileError: if the directory or file is missing, the file is not
        JSON, lacks a key, has a malformed entry, or has a newer
        ``format_version`` than this library reads.

    Example::

        info = read_adapter_config("out/sst2")
        print(info["base_model"], info["adapter"]["method"], len(info["layers"]))
    """
    path = _require_file(Path(directory), CONFIG_NAME)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} should hold a JSON object, found {type(data).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise AdapterFileError(f"{path} lacks keys {missing}; is it a cdvft_jax adapter?")
    if data["library"] != _LIBRARY:
        raise AdapterFileError(f"{path} was written by {data['library']!r}, not by {_LIBRARY}")
    version = data["format_version"]
    if not _is_int(version) or version < 1:
        raise AdapterFileError(f"{path}: format_version should be a positive integer, found {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{path} has format_version {version}, but cdvft_jax {__version__} reads format_version "
            f"{FORMAT_VERSION} at most; upgrade cdvft_jax to load this adapter"
        )
    if version >= 2:
        sha = data.get("weights_sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise AdapterFileError(f"{path}: weights_sha256 should be 64 hex digits (format 2), found {sha!r}")
    _check_structure(data, path)
    return data


def load_adapter(
    directory: str | os.PathLike,
    model: Any,
    *sample_inputs: Any,
    base_params: Params | None = None,
) -> tuple[AdaptedModel, dict]:
    """Rebuilds a saved adapter on ``model`` and returns ``(adapted, params)``.

    Everything is checked before anything is applied: the files, the format
    version, the model class, every adapted layer's path and shape, and every
    stored tensor's key, shape and dtype.  ``base_params`` is never modified;
    ``params`` is a new tree holding the base params, the adapter leaves, and
    the stored ``modules_to_save`` leaves in place of the base ones (as float32).

    Args:
      directory: an adapter directory written by :func:`save_adapter`.
      model: a Hugging Face Flax model, or a ``flax.linen.Module`` with sample
        inputs, as :func:`~cdvft_jax.inject` takes them.
      *sample_inputs: sample inputs for a linen module's ``init``.
      base_params: the base model's params; defaults to ``model.params`` for a
        Hugging Face model and is required for a linen module.

    Returns:
      ``(adapted, params)``: call ``adapted(*inputs, params=params)``.

    Raises:
      AdapterFileError: if a file is missing or corrupt (its SHA-256 differs
        from the config's), the format is newer than this library reads, the
        adapter was made for another model, or a stored tensor is missing,
        unexpected, misshapen, not float32 or not finite.
      ValueError: if ``base_params`` is missing or does not fit ``model``.

    Example::

        model = FlaxRobertaForSequenceClassification.from_pretrained("roberta-base")
        adapted, params = load_adapter("out/sst2", model)
    """
    directory = Path(directory)
    document = read_adapter_config(directory)
    weights_path = _require_file(directory, WEIGHTS_NAME)
    try:
        config = config_from_dict(document["adapter"])
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{directory / CONFIG_NAME}: invalid adapter config: {e}") from e

    model_class = type(model).__name__
    saved_class = document["base_model_class"]
    if saved_class is not None and saved_class != model_class:
        raise AdapterFileError(
            f"the adapter in {directory} was saved from a {saved_class}, not a {model_class}; "
            "load it into the kind of model it was trained on"
        )
    try:
        adapted = inject(model, config, *sample_inputs)
    except ValueError as e:
        raise AdapterFileError(f"the adapter in {directory} does not fit this {model_class}: {e}") from e
    try:
        _check_same(
            document["layers"], _layer_entries(adapted), f"{directory / CONFIG_NAME} does not match this {model_class}"
        )
    except AdapterFileError as e:
        raise AdapterFileError(f"{e}{_old_block_size_hint(document['layers'], adapted)}") from None
    saved_modules = {path: list(shape) for path, shape in _saved_module_shapes(adapted).items()}
    _check_same(
        document["modules_to_save"],
        saved_modules,
        f"{directory / CONFIG_NAME}: modules_to_save does not match this {model_class}",
    )

    base = _flat_base_params(model, base_params, adapted)
    stored = _read_tensors(weights_path, adapted.trainable_shapes(), document.get("weights_sha256"))
    base.update((path, jnp.asarray(value)) for path, value in stored.items())
    base.update(flat_params(adapted.frozen_adapter_params()))
    return adapted, unflat_params(base)


def _require_file(directory: Path, name: str) -> Path:
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory {directory} does not exist")
    path = directory / name
    if not path.is_file():
        raise AdapterFileError(f"{directory} holds no {name}; is it an adapter directory written by save_adapter?")
    return path


def _flat_base_params(model: Any, base_params: Params | None, adapted: AdaptedModel) -> dict[str, Any]:
    """A fresh flat copy of the base params, checked against the model's own parameter shapes."""
    if base_params is None:
        if isinstance(model, nn.Module):
            raise ValueError("load_adapter(directory, module, *sample_inputs, base_params=...): pass base_params")
        try:
            base_params = model.params
        except ValueError as e:  # a model built with _do_init=False holds no params
            raise ValueError(f"{type(model).__name__} holds no params; pass base_params=...") from e
    flat = flat_params(base_params)
    adapter_leaves = sorted(path for path in flat if adapted.is_adapter_leaf(path))
    if adapter_leaves:
        raise ValueError(f"base_params already hold adapter leaves, e.g. {_listing(adapter_leaves)}")
    missing = sorted(set(adapted.base_shapes) - set(flat))
    extra = sorted(set(flat) - set(adapted.base_shapes))
    if missing or extra:
        raise ValueError(f"base_params do not fit the model: missing {_listing(missing)}, unexpected {_listing(extra)}")
    for path, leaf in flat.items():
        if tuple(leaf.shape) != tuple(adapted.base_shapes[path].shape):
            raise ValueError(
                f"base_params leaf {path!r} has shape {tuple(leaf.shape)}, "
                f"the model expects {tuple(adapted.base_shapes[path].shape)}"
            )
    return flat


def _read_tensors(path: Path, expected: Mapping[str, Shape], sha256: str | None) -> dict[str, np.ndarray]:
    """The stored tensors, checked: keys, shapes and dtypes against ``expected`` (from the header, first),
    then the file against ``sha256`` (``None``: a format-1 adapter, which has none) and every value finite.
    """
    try:
        with safe_open(path, framework="np") as f:
            keys = set(f.keys())
            missing = sorted(set(expected) - keys)
            extra = sorted(keys - set(expected))
            if missing or extra:
                problems = []
                if missing:
                    problems.append(f"it lacks {len(missing)} tensors the adapter needs: {_listing(missing)}")
                if extra:
                    problems.append(f"it holds {len(extra)} unexpected tensors: {_listing(extra)}")
                raise AdapterFileError(f"{path} does not match the adapter: " + "; ".join(problems))
            # Checked from the header alone, before any tensor data is read.
            for key in sorted(expected):
                tensor = f.get_slice(key)
                shape = tuple(tensor.get_shape())
                if shape != expected[key]:
                    raise AdapterFileError(f"{path}: tensor {key!r} should have shape {expected[key]}, found {shape}")
                if tensor.get_dtype() != "F32":
                    raise AdapterFileError(
                        f"{path}: tensor {key!r} has dtype {tensor.get_dtype()}; adapters are stored as float32 (F32)"
                    )
    except SafetensorError as e:
        raise AdapterFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise AdapterFileError(
            f"{path} does not match the weights_sha256 in {CONFIG_NAME}: the file was damaged or replaced "
            "after it was saved"
        )
    try:
        tensors = safetensors.numpy.load(data)
    except SafetensorError as e:
        raise AdapterFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    bad = non_finite_leaves(tensors)
    if bad:
        raise AdapterFileError(f"{path} holds NaN or infinite values in {len(bad)} tensors: {_listing(bad)}")
    return {key: tensors[key] for key in expected}


# --- what an adapter looks like -----------------------------------------------------------------


def _layer_entries(adapted: AdaptedModel) -> dict[str, dict[str, Any]]:
    """The ``layers`` entry of the config, in its JSON form (shapes as lists)."""
    return {
        path: {
            "d_in": layer.d_in,
            "d_out": layer.d_out,
            "params": {name: list(shape) for name, shape in layer.param_shapes.items()},
        }
        for path, layer in adapted.layers.items()
    }


def _old_block_size_hint(stored: Mapping[str, Any], adapted: AdaptedModel) -> str:
    """How to load a CDVFT adapter saved before 0.2.0 with ``block_size=None`` on a layer where the old
    default, ``gcd(d_in, d_out)``, differs from today's, ``min(d_in, d_out)``; empty for any other mismatch."""
    config = adapted.config
    if config.method != "cdvft" or config.block_size is not None:
        return ""
    old = {}
    for path, layer in adapted.layers.items():
        saved = stored.get(path, {}).get("params", {}).get("cdv_c")
        gcd = math.gcd(layer.d_in, layer.d_out)
        if saved is not None and saved[-1] == gcd != layer.param_shapes["cdv_c"][-1]:
            old[f"^{re.escape(path)}$"] = {"block_size": gcd}
    if not old:
        return ""
    return (
        f". The adapter was saved with CDVFT's default block size before 0.2.0, gcd(d_in, d_out); today's "
        f"default is min(d_in, d_out). To load it, add to the 'adapter' entry of its {CONFIG_NAME}: "
        f'"overrides": {json.dumps(old)}'
    )


def _saved_module_shapes(adapted: AdaptedModel) -> dict[str, Shape]:
    """``{param path: shape}`` of the base leaves inside ``modules_to_save``."""
    return {
        path: tuple(leaf.shape) for path, leaf in adapted.base_shapes.items() if adapted.config.in_modules_to_save(path)
    }


def _check_same(stored: Mapping[str, Any], found: Mapping[str, Any], what: str) -> None:
    """Raises naming the entries only in the file, only in the model, and those that differ."""
    only_stored = sorted(set(stored) - set(found))
    only_found = sorted(set(found) - set(stored))
    differ = sorted(path for path in set(stored) & set(found) if stored[path] != found[path])
    if not (only_stored or only_found or differ):
        return
    problems = []
    if only_stored:
        problems.append(f"only in the adapter: {_listing(only_stored)}")
    if only_found:
        problems.append(f"only in the model: {_listing(only_found)}")
    for path in differ[:_SHOWN]:
        problems.append(f"{path}: adapter has {stored[path]}, model has {found[path]}")
    raise AdapterFileError(f"{what} (was it saved from another architecture?): " + "; ".join(problems))


def _check_structure(data: Mapping[str, Any], path: Path) -> None:
    def fail(where: str, should: str, value: Any) -> NoReturn:
        raise AdapterFileError(f"{path}: {where} should be {should}, found {value!r}")

    if not isinstance(data["adapter"], dict):
        fail("'adapter'", "an object", data["adapter"])
    for key in ("library_version", "base_model", "base_model_class"):
        if data[key] is not None and not isinstance(data[key], str):
            fail(repr(key), "a string or null", data[key])
    if not isinstance(data["layers"], dict):
        fail("'layers'", "an object", data["layers"])
    for name, layer in data["layers"].items():
        if not isinstance(layer, dict) or set(layer) != {"d_in", "d_out", "params"}:
            fail(f"layers[{name!r}]", 'an object with keys "d_in", "d_out", "params"', layer)
        if not (_is_int(layer["d_in"]) and _is_int(layer["d_out"]) and isinstance(layer["params"], dict)):
            fail(f"layers[{name!r}]", "integer d_in and d_out and a params object", layer)
        for leaf, shape in layer["params"].items():
            if not _is_shape(shape):
                fail(f"layers[{name!r}].params[{leaf!r}]", "a list of non-negative integers", shape)
    if not isinstance(data["modules_to_save"], dict):
        fail("'modules_to_save'", "an object", data["modules_to_save"])
    for name, shape in data["modules_to_save"].items():
        if not _is_shape(shape):
            fail(f"modules_to_save[{name!r}]", "a list of non-negative integers", shape)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(s) and s >= 0 for s in value)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN]) or "none"
    return shown + (f" ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")
