"""Exporting a merged CDVFT model as a plain Hugging Face checkpoint, Flax or PyTorch.

After :meth:`~cdvft_jax.AdaptedModel.merge` the adapter lives inside the
kernels, so the result is an ordinary checkpoint of the base architecture: it
loads with ``from_pretrained`` and runs at the base model's cost, with no
``cdvft_jax`` needed at inference time.

* :func:`save_merged_flax` writes ``config.json`` + ``flax_model.msgpack``.
* :func:`save_merged_torch` writes ``config.json`` + ``model.safetensors`` in
  PyTorch names and layouts, for ``AutoModelFor...Classification`` in PyTorch.
  The conversion (:func:`flax_to_torch_state_dict`) is done with numpy, so
  exporting never needs PyTorch installed.

From the command line, with the base model the adapter records (``--base`` names another copy of it)::

    python -m cdvft_jax.export --adapter runs/sst2/adapter --format torch --out exported/

Example:
  >>> import numpy as np
  >>> tree = {"classifier": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)}}
  >>> {k: v.shape for k, v in flax_to_torch_state_dict(tree).items()}
  {'classifier.weight': (3, 4), 'classifier.bias': (3,)}
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from cdvft_jax.adapter_io import SHARED_FILE_MODE
from cdvft_jax.params import Params, check_finite, flat_params
from cdvft_jax.torch_names import flax_to_torch_state_dict

__all__ = [
    "TORCH_WEIGHTS_NAME",
    "flax_to_torch_state_dict",
    "load_base_model",
    "main",
    "save_merged_flax",
    "save_merged_torch",
]


TORCH_WEIGHTS_NAME = "model.safetensors"
"""The weights file :func:`save_merged_torch` writes, the name transformers' PyTorch loader looks for."""


def _check_merged(model: Any, params: Params) -> None:
    """Raises unless ``params`` has exactly the leaves and shapes of ``model``'s own params, all finite."""
    expected = {p: tuple(s.shape) for p, s in flat_params(model.params_shape_tree).items()}
    got = {p: tuple(np.shape(v)) for p, v in flat_params(params).items()}
    extra = sorted(set(got) - set(expected))
    missing = sorted(set(expected) - set(got))
    wrong = sorted(f"{p}: {got[p]} != {expected[p]}" for p in set(got) & set(expected) if got[p] != expected[p])
    if not (extra or missing or wrong):
        check_finite(params, "the merged params to export")
        return
    problems = []
    if extra:
        problems.append(f"unexpected leaves {extra[:4]}")
    if missing:
        problems.append(f"missing leaves {missing[:4]}")
    if wrong:
        problems.append(f"wrong shapes {wrong[:4]}")
    hint = " (adapter leaves? pass AdaptedModel.merge(params), not the adapted params)" if extra else ""
    raise ValueError(f"params do not fit {type(model).__name__}: {'; '.join(problems)}{hint}")


def _torch_class_name(model: Any) -> str:
    flax_name = type(model).__name__
    if not flax_name.startswith("Flax"):
        raise TypeError(f"expected a Hugging Face Flax model (a Flax... class), got {flax_name}")
    return flax_name.removeprefix("Flax")


def save_merged_flax(model: Any, merged_params: Params, out_dir: str | Path) -> Path:
    """Saves ``merged_params`` as a Flax checkpoint of ``model``'s architecture.

    Writes ``config.json`` and ``flax_model.msgpack`` with
    ``model.save_pretrained``; ``type(model).from_pretrained(out_dir)`` gives
    the adapted model's outputs.

    Args:
      model: the Hugging Face Flax model the adapter was injected into.
      merged_params: :meth:`~cdvft_jax.AdaptedModel.merge` output.
      out_dir: the folder to write (created if needed).

    Returns:
      ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
      ValueError: if ``merged_params`` does not have exactly the model's
        leaves and shapes (e.g. adapter leaves were not merged).
      NonFiniteError: if a leaf holds a NaN or an infinity (nothing is written).
    """
    _check_merged(model, merged_params)
    out = Path(out_dir)
    model.save_pretrained(out, params=merged_params)
    return out


def save_merged_torch(model: Any, merged_params: Params, out_dir: str | Path) -> Path:
    """Saves ``merged_params`` as a PyTorch checkpoint of ``model``'s architecture, without PyTorch.

    Writes ``config.json`` (``architectures`` names the PyTorch class, e.g.
    ``RobertaForSequenceClassification``) and ``model.safetensors`` in
    PyTorch names and layouts (see :func:`flax_to_torch_state_dict`), loadable
    by transformers' PyTorch ``AutoModelForSequenceClassification`` /
    ``AutoModelForImageClassification.from_pretrained(out_dir)``.  Weights
    are float32 and written as one unsharded file.

    Args:
      model: the Hugging Face Flax model the adapter was injected into.
      merged_params: :meth:`~cdvft_jax.AdaptedModel.merge` output.
      out_dir: the folder to write (created if needed).

    Returns:
      ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
      TypeError: if ``model`` is not a Hugging Face ``Flax...`` model.
      ValueError: if ``merged_params`` does not have exactly the model's
        leaves and shapes (e.g. adapter leaves were not merged).
      NonFiniteError: if a leaf holds a NaN or an infinity (nothing is written).
    """
    architecture = _torch_class_name(model)
    _check_merged(model, merged_params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A copy: the caller's model keeps its own config.
    config = copy.deepcopy(model.config)
    config.architectures = [architecture]
    config.save_pretrained(out)
    # transformers reads a safetensors file as PyTorch weights only when its metadata says so.
    save_file(flax_to_torch_state_dict(merged_params), str(out / TORCH_WEIGHTS_NAME), metadata={"format": "pt"})
    os.chmod(out / TORCH_WEIGHTS_NAME, SHARED_FILE_MODE)
    return out


def load_base_model(name_or_path: str, model_class: str | None, num_labels: int | None, from_pt: bool) -> Any:
    """The base checkpoint as an instance of ``model_class``, the Flax class the adapter was saved from.

    The recorded class, rather than a guess from the checkpoint's config
    through one task's Auto class, is exactly what
    :func:`~cdvft_jax.adapter_io.load_adapter` accepts.
    """
    import transformers

    # The prefix test comes first: looking up a PyTorch class name on transformers would import torch.
    is_flax = model_class is not None and model_class.startswith("Flax")
    model_cls = getattr(transformers, model_class, None) if is_flax else None
    if model_cls is None:
        raise ValueError(
            f"the adapter records the model class {model_class!r}, which is not a transformers Flax class; "
            "only adapters of Hugging Face Flax models can be exported"
        )
    overrides = {} if num_labels is None else {"num_labels": num_labels}
    # A head of another size in the checkpoint is replaced, as it was when the adapter was trained.
    return model_cls.from_pretrained(
        name_or_path, from_pt=from_pt, ignore_mismatched_sizes=num_labels is not None, **overrides
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cdvft_jax.export",
        description="Merge a saved CDVFT adapter into its base model and save a plain Flax or PyTorch checkpoint.",
    )
    p.add_argument("--adapter", type=Path, required=True, help="folder written by cdvft_jax.adapter_io.save_adapter")
    p.add_argument("--base", help="hub name or local folder of the base model (default: the one the adapter records)")
    p.add_argument(
        "--format",
        choices=("torch", "flax", "peft-lora"),
        default="torch",
        help="what to write: a merged torch or flax checkpoint, or a peft LoRA adapter (default: torch)",
    )
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, help="peft-lora: the rank of every layer's truncated SVD")
    rank.add_argument("--energy", type=float, help="peft-lora: the share of squared singular values kept per layer")
    p.add_argument("--out", type=Path, required=True, help="output folder (created if needed)")
    p.add_argument(
        "--num-labels",
        type=int,
        help="classifier size the adapter was trained with, when it differs from the base checkpoint's",
    )
    p.add_argument("--from-pt", action="store_true", help="the base checkpoint has PyTorch weights only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cdvft_jax.export``: load base, apply adapter, merge, save.

    The base model is loaded as the Flax class recorded in the adapter
    (``base_model_class``, e.g. ``FlaxRobertaForSequenceClassification``)
    from ``--base``, or from the adapter's recorded ``base_model`` when
    ``--base`` is not given.

    Args:
      argv: command-line arguments without the program name (default:
        ``sys.argv[1:]``).

    Returns:
      The exit status: 0 on success, 1 when the adapter, base model or output
      cannot be used (the reason goes to stderr).  Bad arguments exit with
      argparse's status 2.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.num_labels is not None and args.num_labels < 1:
        parser.error(f"--num-labels must be positive, got {args.num_labels}")
    if args.format == "peft-lora" and args.rank is None and args.energy is None:
        parser.error("--format peft-lora needs --rank or --energy")
    if args.format != "peft-lora" and (args.rank is not None or args.energy is not None):
        parser.error("--rank and --energy apply to --format peft-lora only")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    # Imported here: the functions above work on params alone and must not depend on adapter folders.
    from cdvft_jax.adapter_io import load_adapter, read_adapter_config

    save = save_merged_torch if args.format == "torch" else save_merged_flax
    try:
        info = read_adapter_config(args.adapter)
        base = args.base or info["base_model"]
        if base is None:
            raise ValueError(f"the adapter in {args.adapter} records no base model; pass --base")
        model = load_base_model(base, info["base_model_class"], args.num_labels, args.from_pt)
        adapted, params = load_adapter(args.adapter, model)
        if args.format == "peft-lora":
            from cdvft_jax.peft_lora import save_peft_lora

            report = save_peft_lora(args.out, adapted, params, rank=args.rank, energy=args.energy, base_model=base)
            for path, layer in report.items():
                print(f"{path}: rank {layer.rank}, relative error {layer.relative_error:.3g}")
            print(f"wrote a peft LoRA adapter of {args.adapter} to {args.out}")
            return 0
        out = save(model, adapted.merge(params), args.out)
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote a merged {args.format} checkpoint of {base} with the adapter {args.adapter} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
