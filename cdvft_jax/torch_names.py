"""Flax parameter trees in PyTorch names and layouts, with numpy only (no PyTorch import).

A leaf module: :mod:`cdvft_jax.export` (merged checkpoints) and :mod:`cdvft_jax.peft_lora` (peft adapter
folders) both write PyTorch state dicts with it.

Example:
  >>> import numpy as np
  >>> tree = {"classifier": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)}}
  >>> {k: v.shape for k, v in flax_to_torch_state_dict(tree).items()}
  {'classifier.weight': (3, 4), 'classifier.bias': (3,)}
"""

from __future__ import annotations

import numpy as np

from cdvft_jax.params import Params, flat_params

__all__ = ["flax_to_torch_state_dict"]


def flax_to_torch_state_dict(params: Params) -> dict[str, np.ndarray]:
    """Converts a Hugging Face Flax params tree to a PyTorch state dict of numpy arrays.

    Follows the rules of transformers' own Flax -> PyTorch conversion
    (``load_flax_weights_in_pytorch_model``) without importing PyTorch:

    * the module path is joined with ``"."``;
    * a 4-D ``kernel`` (a convolution, HWIO) becomes ``weight`` in OIHW;
    * any other ``kernel`` becomes ``weight`` transposed (``.T``): a Flax
      ``Dense`` kernel ``(in, out)`` becomes PyTorch's ``Linear`` ``(out, in)``,
      and GPT-2's ``FlaxConv1D`` kernel ``(out, in)`` PyTorch's ``Conv1D``
      ``(in, out)``;
    * ``scale`` (LayerNorm) and ``embedding`` (Embed) become ``weight``;
    * every other leaf (``bias``, ``cls_token``, ``position_embeddings``, ...)
      keeps its name and layout.

    Flax and PyTorch share parameter names for the Hugging Face classes this
    library adapts (RoBERTa, BERT and ViT with their classification heads,
    the decoders Llama, Mistral, Gemma and GPT-2, base-model prefix
    included), so no further renaming is needed.

    Args:
      params: the ``params`` collection of a Flax model, e.g. the output of
        :meth:`~cdvft_jax.AdaptedModel.merge`.

    Returns:
      ``{pytorch name: float32 C-contiguous array}``, ready for
      ``safetensors.numpy.save_file``.

    Raises:
      ValueError: for a tree with batch statistics (BatchNorm models), which
        this conversion does not cover, or when two leaves map to one name.
    """
    if "batch_stats" in params:
        raise ValueError(
            "params hold a 'batch_stats' collection (a BatchNorm model); only models whose state is the "
            "'params' collection alone are supported"
        )
    state: dict[str, np.ndarray] = {}
    for path, leaf in flat_params(params).items():
        *module, name = path.split("/")
        # np.asarray(float32) also turns bfloat16 leaves into something safetensors and PyTorch both read.
        array = np.asarray(leaf, dtype=np.float32)
        if name == "kernel":
            array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
            name = "weight"
        elif name in ("scale", "embedding"):
            name = "weight"
        key = ".".join([*module, name])
        if key in state:
            raise ValueError(f"two Flax parameters map to the PyTorch name {key!r}")
        state[key] = np.ascontiguousarray(array)
    return state
