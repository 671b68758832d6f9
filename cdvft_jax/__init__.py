"""cdvft_jax: circulant-and-diagonal-vector fine-tuning (CDVFT) for Flax models.

The public API:

* the math: :func:`cdv_delta`, :func:`cdv_delta_weight` and the general
  ``2m - 1`` factor :func:`cdv_product_delta` / :func:`cdv_product_weight`,
  with :func:`cdv_shape`, :func:`cdv_num_params`, :func:`cdv_flops_per_token`;
* configs: :class:`CDVFTConfig` (and the generic :class:`AdapterConfig`), and
  the baselines :class:`LoRAConfig`, :class:`VeRAConfig`, :class:`FourierFTConfig`,
  :class:`C3AConfig`, which go through the same injection, training, merge and save code;
* adapting a model: :func:`inject` -> :class:`AdaptedModel` (``init``,
  ``split``, ``merge``, ``unmerge``, ``summary``, ``describe``), and
  :class:`CDVDense` for models you write yourself;
* training: :func:`adapter_optimizer` (with :func:`warmup_linear_decay`, the recipe's schedule, and its
  default :data:`WARMUP_RATIO`),
  :func:`single_tree_optimizer`,
  :func:`make_train_step`, :func:`make_eval_step`, :class:`TrainState`;
* files: :func:`save_adapter`, :func:`load_adapter` (a few-hundred-KB adapter folder),
  :class:`TrainingCheckpointer` (Orbax checkpoints of the trainable state; resume);
* trees: :func:`split_params`, :func:`merge_params`, :func:`count_params`.
"""

# The methods first, in the order they register (the order the programs list them): CDVFT, then the
# baselines.  The isort splits keep that order.
from cdvft_jax.methods.cdvft import CDVFT, INIT_SCHEMES, CDVFTConfig

# isort: split
from cdvft_jax.methods.lora import LORA, LoRAConfig

# isort: split
from cdvft_jax.methods.vera import VERA, VeRAConfig, vera_projections

# isort: split
from cdvft_jax.methods.fourierft import FOURIERFT, FOURIERFT_INIT_SCHEMES, FourierFTConfig, spectral_positions

# isort: split
from cdvft_jax.methods.c3a import C3A, C3A_INIT_SCHEMES, C3AConfig

# isort: split
from cdvft_jax._version import __version__
from cdvft_jax.adapter_io import AdapterFileError, AdapterWriteError, load_adapter, read_adapter_config, save_adapter
from cdvft_jax.cdv import (
    CDVShape,
    block_circulant_apply,
    block_circulant_matrix,
    cdv_delta,
    cdv_delta_weight,
    cdv_flops_per_step,
    cdv_flops_per_token,
    cdv_num_params,
    cdv_product_delta,
    cdv_product_weight,
    cdv_shape,
    padded_block_sizes,
    valid_block_sizes,
)
from cdvft_jax.checkpoint import CheckpointWriteError, CorruptCheckpointError, TrainingCheckpointer
from cdvft_jax.config import ALL_LINEAR, AdapterConfig, config_from_dict, config_from_json
from cdvft_jax.injection import (
    AdaptedLayer,
    AdaptedModel,
    AdapterRows,
    LinearLayer,
    TrainableSummary,
    find_linear_layers,
    inject,
)
from cdvft_jax.layer_types import LINEAR_KINDS, LinearKind
from cdvft_jax.layers import CDVDense
from cdvft_jax.methods.base import AdapterMethod, MethodSpec, method_names, method_spec
from cdvft_jax.params import NonFiniteError, check_finite, count_params, merge_params, non_finite_leaves, split_params
from cdvft_jax.peft_lora import LayerExport, save_peft_lora
from cdvft_jax.stacking import adapter_difference, stack_adapters
from cdvft_jax.training import (
    WARMUP_RATIO,
    TrainState,
    adapter_optimizer,
    init_train_state,
    make_eval_step,
    make_train_step,
    single_tree_optimizer,
    warmup_linear_decay,
)

__all__ = [
    "ALL_LINEAR",
    "LINEAR_KINDS",
    "C3A",
    "C3A_INIT_SCHEMES",
    "CDVFT",
    "FOURIERFT",
    "FOURIERFT_INIT_SCHEMES",
    "INIT_SCHEMES",
    "LORA",
    "LayerExport",
    "VERA",
    "WARMUP_RATIO",
    "AdaptedLayer",
    "AdaptedModel",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterWriteError",
    "AdapterMethod",
    "AdapterRows",
    "C3AConfig",
    "CDVDense",
    "CDVFTConfig",
    "CDVShape",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "FourierFTConfig",
    "LinearKind",
    "LinearLayer",
    "LoRAConfig",
    "MethodSpec",
    "NonFiniteError",
    "TrainState",
    "TrainingCheckpointer",
    "TrainableSummary",
    "VeRAConfig",
    "__version__",
    "adapter_difference",
    "adapter_optimizer",
    "block_circulant_apply",
    "block_circulant_matrix",
    "cdv_delta",
    "cdv_delta_weight",
    "cdv_flops_per_step",
    "cdv_flops_per_token",
    "cdv_num_params",
    "cdv_product_delta",
    "cdv_product_weight",
    "cdv_shape",
    "check_finite",
    "config_from_dict",
    "config_from_json",
    "count_params",
    "find_linear_layers",
    "init_train_state",
    "inject",
    "load_adapter",
    "make_eval_step",
    "make_train_step",
    "merge_params",
    "method_names",
    "method_spec",
    "non_finite_leaves",
    "read_adapter_config",
    "save_adapter",
    "save_peft_lora",
    "single_tree_optimizer",
    "spectral_positions",
    "split_params",
    "stack_adapters",
    "padded_block_sizes",
    "valid_block_sizes",
    "vera_projections",
    "warmup_linear_decay",
]
