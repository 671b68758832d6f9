"""Exporting merged models: Flax and PyTorch checkpoints that reproduce the adapted model's logits."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import HEAD, make_inputs, make_model
from transformers import FlaxBertForSequenceClassification

import cdvft_jax
from cdvft_jax import CDVFTConfig
from cdvft_jax.adapter_io import save_adapter
from cdvft_jax.export import flax_to_torch_state_dict, main, save_merged_flax, save_merged_torch
from cdvft_jax.params import flat_params, unflat_params

TORCH_SKIP = "PyTorch is an optional test dependency; the PyTorch load checks need it"


class Case(NamedTuple):
    family: str
    model: Any
    adapted: cdvft_jax.AdaptedModel
    params: dict
    merged: dict
    inputs: dict
    logits: np.ndarray


def adapt(model, family: str) -> tuple[cdvft_jax.AdaptedModel, dict]:
    config = CDVFTConfig(init="random", alpha=0.5, modules_to_save=[HEAD[family]])
    adapted = cdvft_jax.inject(model, config)
    return adapted, adapted.init(jax.random.key(1), model.params)


@pytest.fixture(scope="module", params=["roberta", "bert", "vit"])
def case(request) -> Case:
    family = request.param
    model = make_model(family)
    adapted, params = adapt(model, family)
    inputs, _ = make_inputs(family)
    logits = np.asarray(adapted(**inputs, params=params).logits)
    # A random adapter must move the logits, or matching them would prove nothing.
    assert not np.allclose(logits, np.asarray(model(**inputs).logits), atol=1e-3)
    return Case(family, model, adapted, params, adapted.merge(params), inputs, logits)


def assert_close(actual, expected, rtol: float) -> None:
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=1e-5 * scale)


def torch_inputs(torch, family: str, inputs: dict) -> dict:
    # torch.tensor copies: JAX hands out read-only buffers, which torch.from_numpy warns about.
    if family == "vit":
        return {"pixel_values": torch.tensor(np.asarray(inputs["pixel_values"]), dtype=torch.float32)}
    ids = torch.tensor(np.asarray(inputs["input_ids"]), dtype=torch.int64)
    out = {"input_ids": ids, "attention_mask": torch.tensor(np.asarray(inputs["attention_mask"]), dtype=torch.int64)}
    if family == "bert":
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


def load_torch(out_dir, family: str):
    """The PyTorch model from ``out_dir`` via the Auto class, asserting every weight was used and set."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = AutoModelForImageClassification if family == "vit" else AutoModelForSequenceClassification
    pt_model, info = auto.from_pretrained(out_dir, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
    assert info["mismatched_keys"] == [] and info["error_msgs"] == [], info
    return pt_model.eval()


def torch_logits(pt_model, family: str, inputs: dict) -> np.ndarray:
    import torch

    with torch.no_grad():
        return pt_model(**torch_inputs(torch, family, inputs)).logits.numpy()


def test_flax_checkpoint_reloads_with_the_adapted_logits(case, tmp_path):
    out = save_merged_flax(case.model, case.merged, tmp_path / "flax")
    assert {p.name for p in out.iterdir()} == {"config.json", "flax_model.msgpack"}
    reloaded = type(case.model).from_pretrained(out)
    assert_close(reloaded(**case.inputs).logits, case.logits, rtol=1e-5)


def test_torch_checkpoint_gives_the_adapted_logits(case, tmp_path):
    pytest.importorskip("torch", reason=TORCH_SKIP)
    config_before = case.model.config.to_dict()
    out = save_merged_torch(case.model, case.merged, tmp_path / "torch")
    assert case.model.config.to_dict() == config_before
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(case.model).__name__.removeprefix("Flax")]
    pt_model = load_torch(out, case.family)
    assert type(pt_model).__name__ == config["architectures"][0]
    assert_close(torch_logits(pt_model, case.family, case.inputs), case.logits, rtol=1e-4)


def test_unmerged_params_are_refused(case, tmp_path):
    for save in (save_merged_flax, save_merged_torch):
        with pytest.raises(ValueError, match=r"AdaptedModel\.merge"):
            save(case.model, case.params, tmp_path)
    flat = flat_params(case.merged)
    del flat[next(p for p in flat if p.startswith(HEAD[case.family] + "/"))]
    with pytest.raises(ValueError, match="missing leaves"):
        save_merged_torch(case.model, unflat_params(flat), tmp_path)
    assert not any(tmp_path.iterdir())


def test_save_merged_torch_needs_a_flax_model(tmp_path):
    with pytest.raises(TypeError, match="Hugging Face Flax model"):
        save_merged_torch(object(), {}, tmp_path)


def test_name_and_layout_mapping():
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((4, 6)).astype(np.float32)
    conv = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)  # HWIO
    scale, bias, table = np.arange(6.0), np.ones(6), rng.standard_normal((10, 4))
    tree = {
        "vit": {
            "embeddings": {
                "cls_token": np.zeros((1, 1, 4)),
                "patch_embeddings": {"projection": {"kernel": conv, "bias": np.ones(7)}},
            },
            "layernorm": {"scale": scale, "bias": bias},
        },
        "word_embeddings": {"embedding": jnp.asarray(table, jnp.bfloat16)},
        "classifier": {"kernel": jnp.asarray(dense), "bias": bias},
    }
    state = flax_to_torch_state_dict(tree)
    assert list(state) == [
        "vit.embeddings.cls_token",
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.embeddings.patch_embeddings.projection.bias",
        "vit.layernorm.weight",
        "vit.layernorm.bias",
        "word_embeddings.weight",
        "classifier.weight",
        "classifier.bias",
    ]
    np.testing.assert_array_equal(state["classifier.weight"], dense.T)
    # OIHW: weight[o, i, h, w] == kernel[h, w, i, o].
    weight = state["vit.embeddings.patch_embeddings.projection.weight"]
    assert weight.shape == (7, 5, 2, 3)
    np.testing.assert_array_equal(weight, np.einsum("hwio->oihw", conv))
    np.testing.assert_array_equal(state["vit.layernorm.weight"], scale)
    np.testing.assert_array_equal(state["word_embeddings.weight"], np.asarray(jnp.asarray(table, jnp.bfloat16), float))
    for array in state.values():
        assert array.dtype == np.float32 and array.flags.c_contiguous


def test_batch_stats_are_refused():
    with pytest.raises(ValueError, match="batch_stats"):
        flax_to_torch_state_dict({"params": {}, "batch_stats": {}})


def test_the_library_never_imports_torch(tmp_path):
    # Without torch installed the check below would hold trivially.
    assert importlib.util.find_spec("torch") is not None, "torch (a test dependency) is not installed"
    code = (
        "import sys, numpy as np, cdvft_jax, cdvft_jax.export\n"
        "assert 'torch' not in sys.modules\n"
        "from safetensors.numpy import save_file\n"
        "state = cdvft_jax.export.flax_to_torch_state_dict({'d': {'kernel': np.ones((2, 3))}})\n"
        f"save_file(state, {str(tmp_path / 'm.safetensors')!r}, metadata={{'format': 'pt'}})\n"
        "assert 'torch' not in sys.modules, 'the export imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# The command line, through adapter folders written by cdvft_jax.adapter_io.


def save_case(case, tmp_path, base_model: str | None = "recorded") -> Path:
    """Saves the case's base model under ``tmp_path/base`` and its adapter under ``tmp_path/adapter``."""
    base = tmp_path / "base"
    case.model.save_pretrained(base)
    recorded = str(base) if base_model == "recorded" else base_model
    return save_adapter(tmp_path / "adapter", case.adapted, case.params, base_model=recorded)


@pytest.mark.parametrize("fmt", ["flax", "torch"])
def test_cli_exports_the_merged_model(case, fmt, tmp_path, capsys):
    adapter, out = save_case(case, tmp_path), tmp_path / "out"
    # No --base: the adapter's recorded base model is used.
    assert main(["--adapter", str(adapter), "--format", fmt, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    if fmt == "flax":
        assert_close(type(case.model).from_pretrained(out)(**case.inputs).logits, case.logits, rtol=1e-5)
    else:
        pytest.importorskip("torch", reason=TORCH_SKIP)
        assert_close(torch_logits(load_torch(out, case.family), case.family, case.inputs), case.logits, rtol=1e-4)


def test_cli_base_and_num_labels(tmp_path, capsys):
    # Trained as train.text does: the 3-label base checkpoint loaded with a new 5-label head.
    base = tmp_path / "base"
    make_model("bert").save_pretrained(base)
    model = FlaxBertForSequenceClassification.from_pretrained(base, num_labels=5, ignore_mismatched_sizes=True)
    adapted, params = adapt(model, "bert")
    adapter = save_adapter(tmp_path / "adapter", adapted, params, base_model=None)
    inputs, _ = make_inputs("bert")
    expected = np.asarray(adapted(**inputs, params=params).logits)

    argv = ["--adapter", str(adapter), "--format", "flax", "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    assert "records no base model; pass --base" in capsys.readouterr().err
    assert main([*argv, "--base", str(base)]) == 1
    assert "modules_to_save does not match" in capsys.readouterr().err
    assert main([*argv, "--base", str(base), "--num-labels", "5"]) == 0
    assert_close(FlaxBertForSequenceClassification.from_pretrained(tmp_path / "out")(**inputs).logits, expected, 1e-5)
    peft_argv = ["--adapter", str(adapter), "--base", str(base), "--num-labels", "5", "--out", str(tmp_path / "peft")]
    assert main([*peft_argv, "--format", "peft-lora", "--energy", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "bert/encoder/layer/0/attention/self/query: rank " in printed and "wrote a peft LoRA adapter" in printed
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base)


def test_cli_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "cdvft_jax.export", "--help"], capture_output=True, text=True, check=True
    )
    assert "--adapter" in done.stdout
    # A RuntimeWarning here means the package imports cdvft_jax.export eagerly, so -m runs the module twice.
    assert done.stderr == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "o"], "required: --adapter"),
        (["--adapter", "a", "--out", "o", "--format", "onnx"], "invalid choice: 'onnx'"),
        (["--adapter", "a", "--out", "o", "--num-labels", "0"], "must be positive"),
        (["--adapter", "a", "--out", "{tmp}/file"], "exists and is not a folder"),
        (["--adapter", "a", "--out", "o", "--format", "peft-lora"], "needs --rank or --energy"),
        (["--adapter", "a", "--out", "o", "--rank", "4"], "apply to --format peft-lora only"),
        (["--adapter", "a", "--out", "o", "--format", "peft-lora", "--rank", "4", "--energy", "0.9"], "not allowed"),
    ],
)
def test_cli_argument_errors(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_unusable_inputs(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    assert main(["--adapter", str(tmp_path / "nope"), *out]) == 1
    assert capsys.readouterr().err.startswith("python -m cdvft_jax.export: error: adapter directory")

    # An adapter of a linen module records no Hugging Face class to load.
    module = nn.Sequential([nn.Dense(4)])
    x = jnp.ones((1, 4))
    adapted = cdvft_jax.inject(module, CDVFTConfig(target_modules=["layers_0"]), x)
    params = adapted.init(jax.random.key(0), module.init(jax.random.key(0), x)["params"])
    save_adapter(tmp_path / "linen", adapted, params, base_model="somewhere")
    assert main(["--adapter", str(tmp_path / "linen"), *out]) == 1
    assert "not a transformers Flax class" in capsys.readouterr().err

    missing = tmp_path / "no_model_here"
    missing.mkdir()
    adapter = save_adapter(tmp_path / "adapter", *adapt(make_model("bert"), "bert"), base_model=str(missing))
    assert main(["--adapter", str(adapter), *out]) == 1
    assert f"found in directory {missing}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "config",
    [
        cdvft_jax.LoRAConfig(rank=4, alpha=8.0, modules_to_save=["classifier"]),
        cdvft_jax.VeRAConfig(rank=8, modules_to_save=["classifier"]),
        cdvft_jax.FourierFTConfig(n_frequency=50, alpha=40.0, modules_to_save=["classifier"]),
        cdvft_jax.C3AConfig(block_size=8, alpha=20.0, modules_to_save=["classifier"]),
    ],
    ids=lambda c: c.method,
)
def test_every_baseline_exports_to_torch_with_the_adapted_logits(config, tmp_path):
    pytest.importorskip("torch", reason=TORCH_SKIP)
    model = make_model("roberta")
    adapted = cdvft_jax.inject(model, config)
    flat = flat_params(adapted.init(jax.random.key(1), model.params))
    rng = np.random.default_rng(0)
    for path, leaf in flat.items():  # every trainable adapter leaf random (LoRA's B starts at zero)
        if adapted.is_adapter_leaf(path) and adapted.is_trainable(path):
            flat[path] = jnp.asarray(rng.standard_normal(leaf.shape), jnp.float32)
    params = unflat_params(flat)
    inputs, _ = make_inputs("roberta")
    logits = np.asarray(adapted(**inputs, params=params).logits)
    # The adapter moves the logits by over 1% of their scale: 1,000 times the tolerance of the match below.
    assert np.abs(logits - np.asarray(model(**inputs).logits)).max() > 1e-2 * np.abs(logits).max()
    out = save_merged_torch(model, adapted.merge(params), tmp_path / "torch")
    assert_close(torch_logits(load_torch(out, "roberta"), "roberta", inputs), logits, rtol=1e-4)


# --- peft LoRA folders ---------------------------------------------------------------------------


def test_an_adapter_exports_to_peft_lora_exactly_at_full_rank_and_lossy_as_reported_below(case, tmp_path):
    pytest.importorskip("torch", reason=TORCH_SKIP)
    from peft import PeftModel

    from cdvft_jax.peft_lora import PEFT_WEIGHTS_NAME, save_peft_lora

    family, model, adapted = case.family, case.model, case.adapted
    flat = flat_params(case.params)
    rng = np.random.default_rng(2)
    for path in adapted.trainable_shapes():  # a head that differs from the base's, so its export is checked
        if not adapted.is_adapter_leaf(path):
            flat[path] = flat[path] + jnp.asarray(0.3 * rng.standard_normal(flat[path].shape), jnp.float32)
    params = unflat_params(flat)
    logits = np.asarray(adapted(**case.inputs, params=params).logits)
    base = save_merged_torch(model, model.params, tmp_path / "base")

    def peft_logits(folder):
        return torch_logits(PeftModel.from_pretrained(load_torch(base, family), folder).eval(), family, case.inputs)

    full = save_peft_lora(tmp_path / "full", adapted, params, rank=1_000, base_model=str(base))
    assert {r.rank for r in full.values()} == {32} and max(r.relative_error for r in full.values()) < 1e-6
    assert_close(peft_logits(tmp_path / "full"), logits, rtol=1e-4)

    low = save_peft_lora(tmp_path / "low", adapted, params, rank=4)
    tensors = safetensors.numpy.load_file(tmp_path / "low" / PEFT_WEIGHTS_NAME)
    merged = dict(flat)
    for path, layer in adapted.layers.items():
        leaves = {n: flat[f"{path}/{n}"] for n in layer.param_shapes}
        update = layer.config.scaling * np.asarray(cdvft_jax.CDVFT.delta_weight(leaves, 32, 32, layer.config))
        name = "base_model.model." + path.replace("/", ".")
        product = tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"]  # (out, in)
        error = np.linalg.norm(update.T - product) / np.linalg.norm(update)
        np.testing.assert_allclose(low[path].relative_error, error, rtol=1e-3, err_msg=path)
        assert low[path].rank == 4 and error > 0.05, path  # a CDV update is far from rank 4 of 32
        merged[f"{path}/kernel"] = flat[f"{path}/kernel"] + jnp.asarray(product.T, jnp.float32)
        del merged[f"{path}/cdv_a_in"], merged[f"{path}/cdv_c"], merged[f"{path}/cdv_a_out"]
    truncated = np.asarray(model(**case.inputs, params=unflat_params(merged)).logits)
    assert_close(peft_logits(tmp_path / "low"), truncated, rtol=1e-4)
    assert np.abs(truncated - logits).max() > 1e-3 * np.abs(logits).max()  # the low-rank export is lossy

    by_energy = save_peft_lora(tmp_path / "energy", adapted, params, energy=0.9)
    for path, layer in adapted.layers.items():
        leaves = {n: flat[f"{path}/{n}"] for n in layer.param_shapes}
        values = np.linalg.svd(np.asarray(cdvft_jax.CDVFT.delta_weight(leaves, 32, 32, layer.config)))[1]
        shares = np.cumsum(values**2) / np.sum(values**2)
        rank = by_energy[path].rank
        assert shares[rank - 1] >= 0.9 - 1e-9 and (rank == 1 or shares[rank - 2] < 0.9), (path, rank, shares)
    assert len({r.rank for r in by_energy.values()}) > 1  # ranks differ per layer: peft's rank_pattern is used
    energy_logits = peft_logits(tmp_path / "energy")  # loads only if every layer's rank is read right
    assert np.abs(energy_logits - logits).max() < np.abs(truncated - logits).max()  # rank >= 4 at 90% here


def test_peft_lora_export_refuses_bad_ranks_and_a_cdvft_adapter_folder(case, tmp_path):
    from cdvft_jax.peft_lora import save_peft_lora

    folder = save_adapter(tmp_path / "adapter", case.adapted, case.params)
    with pytest.raises(ValueError, match=r"not peft's .* the export would overwrite it"):
        save_peft_lora(folder, case.adapted, case.params, rank=4)
    _, reloaded = cdvft_jax.load_adapter(folder, case.model)  # untouched: it still loads, with the same leaves
    for path, leaf in flat_params(case.adapted.split(case.params)[0]).items():
        np.testing.assert_array_equal(flat_params(reloaded)[path], leaf, err_msg=path)

    for kwargs, message in [
        ({}, "exactly one of rank and energy"),
        ({"rank": 4, "energy": 0.5}, "exactly one of rank and energy"),
        ({"rank": 0}, "rank must be a positive int"),
        ({"energy": 1.5}, r"energy must be a number in \(0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            save_peft_lora(tmp_path / "x", case.adapted, case.params, **kwargs)
