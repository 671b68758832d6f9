"""A bridge to peft users: any adapter saved as a peft LoRA adapter folder.

:func:`save_peft_lora` writes ``adapter_config.json`` and ``adapter_model.safetensors`` with peft's key
names (``base_model.model.<module>.lora_A.weight`` ...), so ``peft.PeftModel.from_pretrained(torch_model,
folder)`` loads it on the PyTorch twin of the base model.  Each adapted layer's scaled update
``alpha * dW`` is factored by a truncated SVD, ``dW_r = B A`` (``A: (r, d_in)``, ``B: (d_out, r)``, the
singular values split evenly between them), at a rank given by the caller or the smallest one that
captures a share of the squared singular values; the per-layer rank gets peft's ``rank_pattern`` and
``alpha_pattern`` (alpha = r, so peft's scaling is 1).  The head (``modules_to_save``) is stored in full.

A circulant or CDV ``dW`` is generally full-rank: at a rank below ``min(d_in, d_out)`` the export is
lossy, and the report gives each layer's relative error ``||dW - dW_r||_F / ||dW||_F``.  At full rank it
is exact up to float32 rounding.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors.numpy

from cdvft_jax.injection import AdaptedModel
from cdvft_jax.params import Params, check_finite, flat_params, unflat_params
from cdvft_jax.torch_names import flax_to_torch_state_dict

__all__ = ["PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "LayerExport", "low_rank_factors", "save_peft_lora"]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


class LayerExport(NamedTuple):
    """How one layer's update was exported.

    Attributes:
      rank: the rank kept.
      relative_error: ``||dW - dW_r||_F / ||dW||_F`` (0 for a zero update).
      energy: the share of ``sum(s_i^2)`` the kept singular values carry (1 for a zero update).
    """

    rank: int
    relative_error: float
    energy: float


def low_rank_factors(
    update: np.ndarray, *, rank: int | None = None, energy: float | None = None
) -> tuple[np.ndarray, np.ndarray, LayerExport]:
    """``(A, B, report)`` with ``B @ A`` the best rank-r approximation of ``update`` (``(d_out, d_in)``).

    Exactly one of ``rank`` (capped at ``min(d_out, d_in)``) and ``energy`` (in ``(0, 1]``: the smallest
    rank whose singular values carry that share of ``sum(s_i^2)``) is given.  Computed in float64.

    Example:
      >>> import numpy as np
      >>> update = np.outer([1.0, 2.0], [3.0, 0.0, 1.0])  # rank 1
      >>> a, b, report = low_rank_factors(update, energy=0.99)
      >>> a.shape, b.shape, report.rank, round(report.relative_error, 12)
      ((1, 3), (2, 1), 1, 0.0)
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if energy is not None and not (isinstance(energy, int | float) and 0 < energy <= 1):
        raise ValueError(f"energy must be a number in (0, 1], got {energy!r}")
    u, s, vt = np.linalg.svd(np.asarray(update, np.float64), full_matrices=False)
    total = float(np.sum(s**2))
    captured = np.cumsum(s**2) / total if total > 0 else np.ones_like(s)
    if rank is not None:
        r = min(rank, len(s))
    else:
        r = int(np.searchsorted(captured, energy - 1e-12)) + 1  # the first rank reaching the share
        r = min(max(r, 1), len(s))
    root = np.sqrt(s[:r])
    a, b = root[:, None] * vt[:r], u[:, :r] * root[None, :]
    error = float(np.sqrt(max(total - float(np.sum(s[:r] ** 2)), 0.0) / total)) if total > 0 else 0.0
    return a, b, LayerExport(r, error, float(captured[r - 1]))


def torch_module_name(path: str) -> str:
    """The PyTorch module name of a Flax module path (``bert/encoder/layer/0/...`` -> ``bert.encoder.layer.0...``;
    the Hugging Face classes this library adapts share names across frameworks)."""
    return path.replace("/", ".")


def save_peft_lora(
    directory: str | os.PathLike,
    adapted: AdaptedModel,
    params: Params,
    *,
    rank: int | None = None,
    energy: float | None = None,
    base_model: str | None = None,
) -> dict[str, LayerExport]:
    """Writes ``adapted``'s adapter in ``params`` as a peft LoRA adapter folder; returns the per-layer report.

    Args:
      directory: the folder to write (created if needed); an older peft adapter there is replaced.
      adapted: the adapted model (any method: CDVFT, LoRA, VeRA, FourierFT, C3A).
      params: base params plus the adapter and ``modules_to_save`` leaves (``load_adapter``'s output).
      rank: the rank of every layer (capped at its full rank).
      energy: instead of ``rank``, the share of squared singular values each layer keeps.
      base_model: recorded as peft's ``base_model_name_or_path``.

    Returns:
      ``{module path: LayerExport}`` for every adapted layer.

    Raises:
      ValueError: not exactly one of ``rank`` and ``energy``, bad values, ``params`` lacking a trainable
        leaf, or ``directory`` holding an adapter config that is not peft's (a cdvft_jax adapter).
      NonFiniteError: a trainable leaf holds a NaN or an infinity (nothing is written).
    """
    directory = Path(directory)
    existing = directory / PEFT_CONFIG_NAME
    if existing.is_file() and "peft_type" not in _json_or_empty(existing):
        raise ValueError(
            f"{directory} holds an adapter_config.json that is not peft's (a cdvft_jax adapter, say); "
            "the export would overwrite it: choose another folder"
        )
    flat = flat_params(params)
    missing = sorted(set(adapted.trainable_shapes()) - set(flat))
    if missing:
        raise ValueError(f"params lack {len(missing)} trainable leaves, e.g. {missing[:3]}")
    trainable = {path: flat[path] for path in adapted.trainable_shapes()}
    check_finite(trainable, "the adapter to export")
    tensors: dict[str, np.ndarray] = {}
    report: dict[str, LayerExport] = {}
    for path, layer in adapted.layers.items():
        leaves = {name: flat[f"{path}/{name}"] for name in layer.param_shapes}
        update = np.asarray(
            layer.config.adapter_method.delta_weight(leaves, layer.d_in, layer.d_out, layer.config), np.float64
        )
        a, b, report[path] = low_rank_factors(layer.config.scaling * update.T, rank=rank, energy=energy)
        name = f"base_model.model.{torch_module_name(path)}"
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
    head = unflat_params({p: v for p, v in trainable.items() if not adapted.is_adapter_leaf(p)})
    tensors.update((f"base_model.model.{key}", value) for key, value in flax_to_torch_state_dict(head).items())
    ranks = {torch_module_name(path): export.rank for path, export in report.items()}
    patterns = {re.escape(name): r for name, r in ranks.items()}
    top = max(ranks.values())
    document: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": patterns,
        "alpha_pattern": patterns,  # alpha = r: peft's scaling alpha / r is 1, the update is B A itself
        "target_modules": sorted(ranks),
        # The modules whose weights are stored in full, by their PyTorch names.
        "modules_to_save": sorted({torch_module_name(p.rpartition("/")[0]) for p in flat_params(head)}),
        "lora_dropout": 0.0,
        "bias": "none",
        # peft's name for GPT-2's Conv1D layers, whose weight is stored (in, out); it only changes merging.
        "fan_in_fan_out": any(layer.kernel_layout == "out_in" for layer in adapted.layers.values()),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    directory.mkdir(parents=True, exist_ok=True)
    # The config goes first and comes back last, so a save cut short never pairs new weights with it.
    (directory / PEFT_CONFIG_NAME).unlink(missing_ok=True)
    weights = directory / PEFT_WEIGHTS_NAME
    safetensors.numpy.save_file(tensors, str(weights.with_name(weights.name + ".tmp")), metadata={"format": "pt"})
    weights.with_name(weights.name + ".tmp").replace(weights)
    config = directory / PEFT_CONFIG_NAME
    config.with_name(config.name + ".tmp").write_text(json.dumps(document, indent=2) + "\n")
    config.with_name(config.name + ".tmp").replace(config)
    return report


def _json_or_empty(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return document if isinstance(document, dict) else {}
