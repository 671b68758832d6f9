"""Saving and loading adapters: exact round trips, file size, and every way a file can be wrong."""

import errno
import hashlib
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import TEXT, make_inputs, make_model
from transformers import FlaxRobertaForSequenceClassification, RobertaConfig

import cdvft_jax
from cdvft_jax import CDVFTConfig, adapter_io
from cdvft_jax.adapter_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFileError,
    AdapterWriteError,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from cdvft_jax.export import save_merged_flax
from cdvft_jax.params import flat_params, merge_params, unflat_params

QUERY_A_IN = "roberta/encoder/layer/0/attention/self/query/cdv_a_in"


def trained(model, seed=0):
    """An adapted model and params whose adapter and head both differ from a fresh model's."""
    adapted = cdvft_jax.inject(model, CDVFTConfig(init="random", alpha=0.5, modules_to_save=["classifier"]))
    flat = flat_params(adapted.init(jax.random.key(seed), model.params))
    for path in flat:
        if adapted.config.in_modules_to_save(path):
            flat[path] = flat[path] + 0.25 * (seed + 1)  # a head the fresh model does not have
    return adapted, unflat_params(flat)


def logits(adapted, family, params):
    inputs, _ = make_inputs(family)
    return adapted(**inputs, params=params).logits


def stored_size(path):
    """``(header length, file size)`` of a safetensors file."""
    data = path.read_bytes()
    return int.from_bytes(data[:8], "little"), len(data)


def assert_same_leaves(tree, snapshot):
    """``tree`` still holds exactly the arrays ``snapshot`` recorded, unchanged."""
    flat = flat_params(tree)
    assert flat.keys() == snapshot.keys()
    for path, (leaf, value) in snapshot.items():
        assert flat[path] is leaf, path
        np.testing.assert_array_equal(flat[path], value, err_msg=path)


def snapshot(tree):
    return {path: (leaf, np.asarray(leaf)) for path, leaf in flat_params(tree).items()}


@pytest.fixture(scope="module")
def roberta():
    return make_model("roberta")


@pytest.fixture(scope="module")
def saved(roberta, tmp_path_factory):
    """A valid RoBERTa adapter directory (read-only: copy it before changing it)."""
    adapted, params = trained(roberta)
    return save_adapter(tmp_path_factory.mktemp("saved") / "adapter", adapted, params, base_model="tiny-roberta")


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "adapter")


def test_round_trip_into_a_fresh_model_is_exact(family, tmp_path):
    model = make_model(family)
    adapted, params = trained(model)
    expected = logits(adapted, family, params)
    directory = save_adapter(tmp_path / "adapter", adapted, params, base_model=f"tiny-{family}")
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]

    fresh = make_model(family)
    assert fresh is not model
    base = snapshot(fresh.params)
    loaded, loaded_params = load_adapter(directory, fresh)
    np.testing.assert_array_equal(logits(loaded, family, loaded_params), expected)
    assert loaded.config == adapted.config
    assert loaded.layers.keys() == adapted.layers.keys()
    want = flat_params(params)
    got = flat_params(loaded_params)
    assert got.keys() == want.keys()
    for path, leaf in want.items():
        np.testing.assert_array_equal(got[path], leaf, err_msg=path)
    assert_same_leaves(fresh.params, base)

    info = read_adapter_config(directory)
    assert info["base_model"] == f"tiny-{family}"
    assert info["base_model_class"] == type(model).__name__
    assert info["library_version"] == cdvft_jax.__version__
    assert info["adapter"] == adapted.config.to_dict()


def test_round_trip_of_a_linen_module(tmp_path):
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(nn.relu(nn.Dense(16, name="hidden")(x)))

    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8)), jnp.float32)
    base = MLP().init(jax.random.key(1), x)["params"]
    config = CDVFTConfig(target_modules=["hidden"], modules_to_save=["head"], init="random")
    adapted = cdvft_jax.inject(MLP(), config, x)
    params = adapted.init(jax.random.key(0), base)
    save_adapter(tmp_path, adapted, params)

    with pytest.raises(ValueError, match="pass base_params"):
        load_adapter(tmp_path, MLP(), x)
    loaded, loaded_params = load_adapter(tmp_path, MLP(), x, base_params=base)
    np.testing.assert_array_equal(loaded(x, params=loaded_params), adapted(x, params=params))


def test_only_trainable_leaves_are_stored_and_the_size_is_exact(roberta, saved):
    adapted, params = trained(roberta)
    trainable = {p for p in flat_params(params) if adapted.is_trainable(p)}
    stored = safetensors.numpy.load_file(saved / WEIGHTS_NAME)
    assert stored.keys() == trainable
    assert not any(p.endswith("/kernel") and not p.startswith("classifier/") for p in stored)
    assert all(v.dtype == np.float32 for v in stored.values())

    scalars = sum(v.size for v in stored.values())
    # 2 layers x (query, value) x 3 vectors of 32, plus the head: 32 x 32 + 32 and 32 x 3 + 3.
    assert scalars == 2 * 2 * 3 * 32 + (32 * 32 + 32) + (32 * 3 + 3) == 1539
    header, size = stored_size(saved / WEIGHTS_NAME)
    assert size == 8 + header + 4 * scalars
    assert (saved / WEIGHTS_NAME).stat().st_mode & 0o777 == 0o644  # shareable, unlike safetensors' 0600


def test_roberta_base_adapter_holds_55296_scalars_plus_the_head(tmp_path):
    # _do_init=False and inject's abstract trace: the 125M base weights are never allocated.
    model = FlaxRobertaForSequenceClassification(RobertaConfig(), _do_init=False)
    adapted = cdvft_jax.inject(model, CDVFTConfig(modules_to_save=["classifier"]))
    head = {p: np.zeros(s.shape, np.float32) for p, s in adapted.base_shapes.items() if p.startswith("classifier/")}
    trainable = merge_params(adapted.init_adapter(jax.random.key(0)), unflat_params(head))
    save_adapter(tmp_path, adapted, trainable, base_model="roberta-base")

    head_scalars = 768 * 768 + 768 + 768 * 2 + 2
    assert sum(v.size for v in head.values()) == head_scalars
    header, size = stored_size(tmp_path / WEIGHTS_NAME)
    assert size == 8 + header + 4 * (55_296 + head_scalars)
    assert read_adapter_config(tmp_path)["base_model_class"] == "FlaxRobertaForSequenceClassification"


# --- bad files ----------------------------------------------------------------------------------


def edit_config(**changes):
    def edit(directory):
        path = directory / CONFIG_NAME
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))

    return edit


def edit_tensors(change):
    def edit(directory):
        path = directory / WEIGHTS_NAME
        tensors = safetensors.numpy.load_file(path)
        change(tensors)
        safetensors.numpy.save_file(tensors, path, metadata={"format": "cdvft_jax"})

    return edit


def flip_data_byte(directory):
    path = directory / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's values: the header still reads fine
    path.write_bytes(bytes(data))


def store_nan_with_its_hash(directory):
    """A file that matches its config's SHA-256 but holds a NaN (as a tool other than save_adapter might write)."""
    path = directory / WEIGHTS_NAME
    tensors = safetensors.numpy.load_file(path)
    tensors[QUERY_A_IN][3] = np.nan
    safetensors.numpy.save_file(tensors, path, metadata={"format": "cdvft_jax"})
    edit_config(weights_sha256=hashlib.sha256(path.read_bytes()).hexdigest())(directory)


def remove_config_key(key):
    def edit(directory):
        path = directory / CONFIG_NAME
        data = json.loads(path.read_text())
        del data[key]
        path.write_text(json.dumps(data))

    return edit


def truncate(directory):
    path = directory / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_header(directory):
    path = directory / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[10:20] = bytes(b ^ 0xFF for b in data[10:20])
    path.write_bytes(bytes(data))


def rewrite_modules_to_save(directory):
    path = directory / CONFIG_NAME
    data = json.loads(path.read_text())
    data["modules_to_save"]["classifier/dense/kernel"] = [32, 33]
    path.write_text(json.dumps(data))


BAD_FILES = {
    "no config": (lambda d: (d / CONFIG_NAME).unlink(), f"holds no {CONFIG_NAME}"),
    "no weights": (lambda d: (d / WEIGHTS_NAME).unlink(), f"holds no {WEIGHTS_NAME}"),
    "config not json": (lambda d: (d / CONFIG_NAME).write_text('{"format_version": 1,'), "is not valid JSON"),
    "config not an object": (lambda d: (d / CONFIG_NAME).write_text("[1]"), "should hold a JSON object"),
    "config lacks a key": (remove_config_key("layers"), r"lacks keys \['layers'\]"),
    "other library": (edit_config(library="peft"), "written by 'peft', not by cdvft_jax"),
    "newer format": (
        edit_config(format_version=99),
        r"format_version 99, but cdvft_jax .* reads format_version 2 at most; upgrade cdvft_jax",
    ),
    "malformed layers": (edit_config(layers=[]), "'layers' should be an object"),
    "unknown method": (edit_config(adapter={"method": "nope"}), "invalid adapter config: unknown adapter method"),
    "target not in model": (
        edit_config(adapter=CDVFTConfig(target_modules=["nowhere"]).to_dict()),
        "does not fit this FlaxRobertaForSequenceClassification: target_modules entry 'nowhere'",
    ),
    "head shape": (rewrite_modules_to_save, r"modules_to_save does not match .*classifier/dense/kernel"),
    "truncated": (truncate, f"{WEIGHTS_NAME} is not a readable safetensors file \\(truncated or corrupt"),
    "flipped data byte": (flip_data_byte, f"{WEIGHTS_NAME} does not match the weights_sha256 in {CONFIG_NAME}"),
    "nan value": (store_nan_with_its_hash, f"holds NaN or infinite values in 1 tensors: {QUERY_A_IN}"),
    "malformed hash": (edit_config(weights_sha256="abc"), "weights_sha256 should be 64 hex digits"),
    "flipped header": (flip_header, f"{WEIGHTS_NAME} is not a readable safetensors file \\(truncated or corrupt"),
    "missing tensor": (edit_tensors(lambda t: t.pop(QUERY_A_IN)), f"lacks 1 tensors the adapter needs: {QUERY_A_IN}"),
    "extra tensor": (
        edit_tensors(lambda t: t.update(extra=np.zeros(2, np.float32))),
        "holds 1 unexpected tensors: extra",
    ),
    "wrong shape": (
        edit_tensors(lambda t: t.update({QUERY_A_IN: np.zeros(16, np.float32)})),
        rf"tensor '{QUERY_A_IN}' should have shape \(32,\), found \(16,\)",
    ),
    "float16": (
        edit_tensors(lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()})),
        r"has dtype F16; adapters are stored as float32",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_adapter_file_is_refused_and_nothing_is_applied(case, roberta, copy):
    corrupt, message = BAD_FILES[case]
    corrupt(copy)
    base = roberta.params
    before = snapshot(base)
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(copy, roberta, base_params=base)
    assert_same_leaves(base, before)


def test_a_missing_directory_is_named(roberta, tmp_path):
    with pytest.raises(AdapterFileError, match=r"adapter directory .*nowhere does not exist"):
        load_adapter(tmp_path / "nowhere", roberta)


@pytest.mark.parametrize("changes", [{}, {"hidden_size": 48}])
def test_an_adapter_for_another_architecture_is_refused(saved, copy, changes):
    """A BERT model (by class, then by layer paths) and a wider RoBERTa (by shapes)."""
    if changes:
        other = FlaxRobertaForSequenceClassification(RobertaConfig(**TEXT | changes), seed=0)
        mismatch = r"roberta/encoder/layer/0/attention/self/query: adapter has .*'d_in': 32.*model has .*'d_in': 48"
    else:
        other = make_model("bert")
        with pytest.raises(AdapterFileError, match="saved from a FlaxRobertaForSequenceClassification, not a FlaxBert"):
            load_adapter(saved, other)
        mismatch = r"another architecture.*only in the adapter: roberta/.*only in the model: bert/"
    # Without the class recorded, the layer paths and shapes still give it away.
    edit_config(base_model_class=None)(copy)
    before = snapshot(other.params)
    with pytest.raises(AdapterFileError, match=mismatch):
        load_adapter(copy, other)
    assert_same_leaves(other.params, before)


def test_base_params_that_do_not_fit_are_refused(roberta, saved):
    _, params = trained(roberta)
    with pytest.raises(ValueError, match="already hold adapter leaves"):
        load_adapter(saved, roberta, base_params=params)
    wider = make_model("bert").params
    with pytest.raises(ValueError, match="base_params do not fit the model"):
        load_adapter(saved, roberta, base_params=wider)


# --- crashes while saving -----------------------------------------------------------------------


def full_disk(path, data):
    with open(path, "wb") as f:
        f.write(data[:100])  # a partial write, then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_crash_while_writing_keeps_the_older_adapter(roberta, copy, monkeypatch):
    before_files = sorted(os.listdir(copy))
    _, old = load_adapter(copy, roberta)
    newer, newer_params = trained(roberta, seed=1)
    monkeypatch.setattr(adapter_io, "_write_durably", full_disk)
    expected = (
        rf"could not write the adapter in {copy}: .*No space left on device; the adapter saved there before stays"
    )
    with pytest.raises(AdapterWriteError, match=expected):
        save_adapter(copy, newer, newer_params)
    monkeypatch.undo()

    assert sorted(os.listdir(copy)) == before_files  # no temporary files left behind
    _, loaded = load_adapter(copy, roberta)
    for path, leaf in flat_params(old).items():
        np.testing.assert_array_equal(flat_params(loaded)[path], leaf, err_msg=path)


def test_a_crash_while_writing_a_new_directory_leaves_no_adapter(roberta, tmp_path, monkeypatch):
    adapted, params = trained(roberta)
    monkeypatch.setattr(adapter_io, "_write_durably", full_disk)
    with pytest.raises(AdapterWriteError, match="No space left on device; the folder holds no loadable adapter"):
        save_adapter(tmp_path / "new", adapted, params)
    monkeypatch.undo()
    with pytest.raises(AdapterFileError, match=f"holds no {CONFIG_NAME}"):
        load_adapter(tmp_path / "new", roberta)


def test_a_crash_between_the_renames_leaves_no_config(roberta, copy, monkeypatch):
    """New weights beside the older config could load with the wrong settings, so the config goes first."""
    replace = os.replace

    def crash_on_config(src, dst):
        if os.path.basename(dst) == CONFIG_NAME:
            raise OSError("killed")
        replace(src, dst)

    newer, newer_params = trained(roberta, seed=1)
    monkeypatch.setattr(os, "replace", crash_on_config)
    with pytest.raises(AdapterWriteError, match="killed; the folder holds no loadable adapter"):
        save_adapter(copy, newer, newer_params)
    monkeypatch.undo()
    assert sorted(os.listdir(copy)) == [WEIGHTS_NAME]
    with pytest.raises(AdapterFileError, match=f"holds no {CONFIG_NAME}"):
        load_adapter(copy, roberta)


def test_saving_needs_every_trainable_leaf(roberta, tmp_path):
    adapted, _ = trained(roberta)
    with pytest.raises(ValueError, match="params lack 12 trainable leaves"):
        save_adapter(tmp_path, adapted, roberta.params)
    assert not (tmp_path / CONFIG_NAME).exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_adapter_is_never_saved_merged_or_exported(roberta, copy, bad):
    adapted, params = trained(roberta)
    flat = flat_params(params)
    leaf = next(p for p in flat if p.endswith("/cdv_c"))
    flat[leaf] = flat[leaf].at[0, 0, 1].set(bad)
    poisoned = unflat_params(flat)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    message = f"the adapter to save holds NaN or infinite values in 1 leaves: {leaf}"
    with pytest.raises(cdvft_jax.NonFiniteError, match=message):
        save_adapter(copy, adapted, poisoned)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before  # the older adapter is untouched
    with pytest.raises(cdvft_jax.NonFiniteError, match=f"the adapter to merge .* {leaf}"):
        adapted.merge(poisoned)
    # A merge that skips the check (as inside jit) poisons the kernels, which export then refuses.
    merged = adapted.merge(poisoned, check_finite=False)
    with pytest.raises(cdvft_jax.NonFiniteError, match=r"the merged params to export .* 1 leaves: .*query/kernel"):
        save_merged_flax(roberta, merged, copy.parent / "export")
    assert not (copy.parent / "export").exists()


def test_non_finite_leaves_reads_floating_leaves_and_refuses_tracers():
    tree = {"a": {"ids": np.array([1, 2]), "w": np.array([0.0, -np.inf]), "ok": np.ones(3, np.float16)}}
    assert cdvft_jax.non_finite_leaves(tree) == ["a/w"]
    with pytest.raises(TypeError, match="inside a traced function"):
        jax.jit(lambda t: cdvft_jax.non_finite_leaves({"x": t}) and t)(np.ones(2))


def test_a_format_1_adapter_without_a_hash_still_loads(roberta, copy, saved):
    edit_config(format_version=1)(copy)
    remove_config_key("weights_sha256")(copy)
    _, params = load_adapter(copy, roberta)
    _, expected = load_adapter(saved, roberta)
    for path, leaf in flat_params(expected).items():
        np.testing.assert_array_equal(flat_params(params)[path], leaf, err_msg=path)


def test_an_adapter_saved_with_the_old_gcd_default_block_size_names_the_overrides_that_load_it(tmp_path):
    # Before 0.2.0, block_size=None on a non-square layer meant gcd(d_in, d_out): 16 for a 32 -> 48 layer, which
    # is 32 now; such a file stores cdv_c of the old shape.  Simulated by saving with the old size set
    # explicitly, then writing the config as the old default would have.
    model = FlaxRobertaForSequenceClassification(RobertaConfig(**{**TEXT, "intermediate_size": 48}), seed=0)
    layer = "roberta/encoder/layer/0/intermediate/dense"
    config = CDVFTConfig(
        target_modules=["intermediate/dense"], init="random", overrides={r".*/intermediate/dense": {"block_size": 16}}
    )
    adapted = cdvft_jax.inject(model, config)
    params = adapted.init(jax.random.key(0), model.params)
    inputs, _ = make_inputs("roberta")
    expected = adapted(**inputs, params=params).logits
    out = save_adapter(tmp_path / "old", adapted, params)
    document = json.loads((out / CONFIG_NAME).read_text())
    assert document["layers"][layer]["params"]["cdv_c"] == [3, 2, 16]
    document["adapter"]["overrides"] = {}
    (out / CONFIG_NAME).write_text(json.dumps(document))

    with pytest.raises(AdapterFileError, match=r"before 0\.2\.0, gcd\(d_in, d_out\).*\"overrides\": (\{.*\})") as info:
        load_adapter(out, model)
    # The message holds the exact overrides for every such layer (both layers of the tiny model), and with them
    # the file loads to the saved model's outputs.
    hint = json.loads(str(info.value).split('"overrides": ', 1)[1])
    assert hint == {f"^{p}$": {"block_size": 16} for p in (layer, layer.replace("layer/0", "layer/1"))}
    document["adapter"]["overrides"] = hint
    (out / CONFIG_NAME).write_text(json.dumps(document))
    loaded, loaded_params = load_adapter(out, model)
    np.testing.assert_array_equal(loaded(**inputs, params=loaded_params).logits, expected)
