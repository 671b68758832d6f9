"""The baseline methods (LoRA, VeRA, FourierFT, C3A) on the shared machinery, against float64 NumPy references."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import (
    HEAD,
    TEXT,
    check_merge_and_unmerge,
    check_training_changes_only_trainable_leaves,
    make_inputs,
    make_model,
)
from transformers import (
    FlaxRobertaForSequenceClassification,
    FlaxViTForImageClassification,
    RobertaConfig,
    ViTConfig,
)

import cdvft_jax
from cdvft_jax import C3A, FOURIERFT, LORA, VERA, C3AConfig, CDVFTConfig, FourierFTConfig, LoRAConfig, VeRAConfig
from cdvft_jax.adapter_io import load_adapter, save_adapter
from cdvft_jax.params import flat_params, unflat_params

F64 = np.float64


def random_leaves(method, config, d_in, d_out, seed=0):
    """Leaves from ``init`` with every trainable one replaced by random values (nothing at zero)."""
    leaves = method.init(jax.random.key(seed), d_in, d_out, config, "layer")
    rng = np.random.default_rng(seed)
    return {
        name: value if name in method.frozen_leaves else jnp.asarray(rng.standard_normal(value.shape), jnp.float32)
        for name, value in leaves.items()
    }


def as64(leaves):
    return {name: np.asarray(value, F64) for name, value in leaves.items()}


def fourierft_reference(spectrum, d_in, d_out, config):
    """FourierFT's own layout: the spectrum is ``(d_out, d_in)`` like a PyTorch weight; dW is its transpose."""
    rows, cols = cdvft_jax.spectral_positions(d_in, d_out, config.n_frequency, config.random_loc_seed)
    torch_layout = np.zeros((d_out, d_in), F64)
    torch_layout[cols, rows] = spectrum
    return np.fft.ifft2(torch_layout).real.T


def c3a_reference(kernel, d_in, d_out):
    """C3A's definition, entry by entry: in PyTorch's ``(out, in)`` layout, block ``(i, j)`` has entry ``(r, s)``
    equal to ``kernel[i, j, (s - r) mod b] / d_in``; dW is its transpose."""
    q_out, q_in, b = kernel.shape
    torch_layout = np.zeros((d_out, d_in), F64)
    for i in range(q_out):
        for j in range(q_in):
            for r in range(b):
                for s in range(b):
                    torch_layout[i * b + r, j * b + s] = kernel[i, j, (s - r) % b]
    return torch_layout.T / d_in


REFERENCES = {
    "lora": (LORA, LoRAConfig(rank=3), lambda p, d_in, d_out, c: p["lora_a"] @ p["lora_b"]),
    "vera": (
        VERA,
        VeRAConfig(rank=5),
        lambda p, d_in, d_out, c: (p["vera_a"] * p["vera_lambda_d"]) @ p["vera_b"] * p["vera_lambda_b"],
    ),
    "fourierft": (
        FOURIERFT,
        FourierFTConfig(n_frequency=37),
        lambda p, d_in, d_out, c: fourierft_reference(p["fourierft_spectrum"], d_in, d_out, c),
    ),
    "c3a": (C3A, C3AConfig(block_size=4), lambda p, d_in, d_out, c: c3a_reference(p["c3a_kernel"], d_in, d_out)),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize(("d_in", "d_out"), [(16, 16), (24, 40), (40, 8)])
def test_delta_and_delta_weight_match_a_float64_reference(name, d_in, d_out):
    method, config, reference = REFERENCES[name]
    leaves = random_leaves(method, config, d_in, d_out)
    expected_w = reference(as64(leaves), d_in, d_out, config)
    assert expected_w.shape == (d_in, d_out)
    scale = np.abs(expected_w).max()
    assert scale > 0
    np.testing.assert_allclose(method.delta_weight(leaves, d_in, d_out, config), expected_w, rtol=0, atol=1e-6 * scale)

    x = np.random.default_rng(1).standard_normal((2, 3, d_in)).astype(np.float32)
    expected = x.astype(F64) @ expected_w
    got = method.delta(leaves, jnp.asarray(x), d_out, config, None)
    assert got.dtype == jnp.float32 and got.shape == (2, 3, d_out)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # bfloat16 activations: the delta still comes out in float32, from the rounded inputs.
    got16 = method.delta(leaves, jnp.asarray(x, jnp.bfloat16), d_out, config, None)
    assert got16.dtype == jnp.float32
    x16 = np.asarray(jnp.asarray(x, jnp.bfloat16), F64)
    np.testing.assert_allclose(got16, x16 @ expected_w, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_fourierft_positions_are_distinct_seeded_and_shared_by_same_shaped_layers():
    rows, cols = cdvft_jax.spectral_positions(24, 40, 300, 777)
    assert rows.min() >= 0 and rows.max() < 24 and cols.min() >= 0 and cols.max() < 40
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == 300
    again = cdvft_jax.spectral_positions.__wrapped__(24, 40, 300, 777)  # uncached: same draw
    np.testing.assert_array_equal(again[0], rows)
    np.testing.assert_array_equal(again[1], cols)
    other = cdvft_jax.spectral_positions(24, 40, 300, 778)
    assert not np.array_equal(other[0] * 40 + other[1], rows * 40 + cols)


def test_vera_projections_come_from_the_seed_alone_and_are_not_trainable():
    config = VeRAConfig(rank=4)
    one = VERA.init(jax.random.key(0), 16, 24, config, "a")
    two = VERA.init(jax.random.key(1), 16, 24, config, "b")
    for name in ("vera_a", "vera_b"):
        np.testing.assert_array_equal(one[name], two[name])
    # PyTorch kaiming_uniform_ bounds: sqrt(6 / fan_in), fan-in d_in for A and r for B.
    assert np.abs(one["vera_a"]).max() <= (6 / 16) ** 0.5 and np.abs(one["vera_a"]).max() > 0.5 * (6 / 16) ** 0.5
    assert np.abs(one["vera_b"]).max() <= (6 / 4) ** 0.5
    other = VERA.init(jax.random.key(0), 16, 24, VeRAConfig(rank=4, projection_seed=1), "a")
    assert not np.array_equal(other["vera_a"], one["vera_a"])
    assert VERA.num_params(16, 24, config) == 4 + 24
    np.testing.assert_array_equal(one["vera_lambda_d"], np.full(4, 0.1, np.float32))


# --- on real Hugging Face models ----------------------------------------------------------------

CONFIGS = {
    "lora": lambda **kw: LoRAConfig(rank=4, alpha=8.0, **kw),
    "vera": lambda **kw: VeRAConfig(rank=8, **kw),
    "fourierft": lambda **kw: FourierFTConfig(n_frequency=50, alpha=40.0, **kw),
    "c3a": lambda **kw: C3AConfig(block_size=8, alpha=20.0, **kw),  # alpha: the delta is divided by d_in
}
ZERO_INIT = {"lora": {}, "vera": {}, "fourierft": {"init": "zero"}, "c3a": {"init": "zero"}}


def adapt(model, family, name, **kwargs):
    return cdvft_jax.inject(model, CONFIGS[name](modules_to_save=[HEAD[family]], **kwargs))


def moved(adapted, params, seed=3):
    """``params`` with every trainable adapter leaf set to random values, so the adapter changes the model."""
    rng = np.random.default_rng(seed)
    flat = flat_params(params)
    for path, value in flat.items():
        if adapted.is_adapter_leaf(path) and adapted.is_trainable(path):
            flat[path] = jnp.asarray(rng.standard_normal(value.shape), jnp.float32)
    return unflat_params(flat)


def logits(fn, family, params, **kwargs):
    inputs, _ = make_inputs(family)
    return fn(**inputs, params=params, **kwargs).logits


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero_init_gives_the_base_logits_exactly(name, family):
    model = make_model(family)
    adapted = adapt(model, family, name, **ZERO_INIT[name])
    params = adapted.init(jax.random.key(0), model.params)
    np.testing.assert_array_equal(logits(adapted, family, params), logits(model, family, model.params))
    np.testing.assert_array_equal(
        jax.jit(lambda p: logits(adapted, family, p))(params),
        jax.jit(lambda p: logits(model, family, p))(model.params),
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_merged_model_gives_the_adapted_outputs_and_unmerge_restores(name, family):
    model = make_model(family)
    adapted = adapt(model, family, name)
    check_merge_and_unmerge(adapted, model, moved(adapted, adapted.init(jax.random.key(0), model.params)), family)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_lowers_the_loss_and_changes_only_trainable_leaves(name):
    model = make_model("roberta")
    check_training_changes_only_trainable_leaves(adapt(model, "roberta", name), model, "roberta")


def test_trainable_counts_and_veras_frozen_projections():
    model = make_model("roberta")
    layers, d = 2 * 2, TEXT["hidden_size"]  # (query, value) x 2 layers, square
    head = d * d + d + d * 3 + 3
    expected = {
        "lora": layers * 2 * 4 * d,
        "vera": layers * (8 + d),
        "fourierft": layers * 50,
        "c3a": layers * d * d // 8,
    }
    for name, count in expected.items():
        adapted = adapt(model, "roberta", name)
        params = adapted.init(jax.random.key(0), model.params)
        summary = adapted.summary(params)
        assert summary.adapter == count, name
        assert summary.modules_to_save == head
        assert summary.total == cdvft_jax.count_params(params)
        assert cdvft_jax.count_params(adapted.split(params)[0]) == count + head
    vera = adapt(model, "roberta", "vera")
    params = vera.init(jax.random.key(0), model.params)
    trainable, frozen = vera.split(params)
    query = "roberta/encoder/layer/0/attention/self/query"
    assert f"{query}/vera_a" in flat_params(frozen) and f"{query}/vera_b" in flat_params(frozen)
    assert set(flat_params(trainable)) >= {f"{query}/vera_lambda_d", f"{query}/vera_lambda_b"}
    assert "adapted (40 params)" in vera.describe()  # lambda_d (8) + lambda_b (32), projections not counted


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_and_load_round_trip_exactly_and_store_only_trainable_leaves(name, tmp_path):
    model = make_model("roberta")
    adapted = adapt(model, "roberta", name)
    params = moved(adapted, adapted.init(jax.random.key(0), model.params))
    save_adapter(tmp_path / "a", adapted, params)
    keys = set(safetensors.numpy.load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys == set(flat_params(adapted.split(params)[0]))
    assert not any(k.endswith(("/vera_a", "/vera_b")) for k in keys)

    fresh = make_model("roberta")
    loaded_adapted, loaded = load_adapter(tmp_path / "a", fresh)
    assert type(loaded_adapted.config) is type(adapted.config)
    assert loaded_adapted.config == adapted.config
    np.testing.assert_array_equal(logits(loaded_adapted, "roberta", loaded), logits(adapted, "roberta", params))


def test_lora_dropout_is_unbiased_and_only_active_in_training_calls():
    config = LoRAConfig(rank=4, dropout=0.25)
    leaves = random_leaves(LORA, config, 12, 10)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 12)), jnp.float32)
    plain = LORA.delta(leaves, x, 10, LoRAConfig(rank=4), None)
    np.testing.assert_array_equal(LORA.delta(leaves, x, 10, config, None), plain)
    draws = jax.vmap(lambda k: LORA.delta(leaves, x, 10, config, k))(jax.random.split(jax.random.key(0), 4000))
    assert not np.allclose(draws[0], draws[1])
    # Inverted dropout keeps the expectation: the sample mean is within 5 standard errors of the plain delta.
    stderr = np.asarray(draws).std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(np.asarray(draws).mean(axis=0) - plain) < 5 * stderr + 1e-6)

    # In a model: a training call (with a dropout rng) draws masks, an evaluation call does not.
    quiet = RobertaConfig(**TEXT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = FlaxRobertaForSequenceClassification(quiet, seed=0)
    with_dropout = cdvft_jax.inject(model, LoRAConfig(rank=4, dropout=0.5))
    without = cdvft_jax.inject(model, LoRAConfig(rank=4))
    params = moved(with_dropout, with_dropout.init(jax.random.key(0), model.params))
    eval_logits = logits(with_dropout, "roberta", params, train=False)
    np.testing.assert_array_equal(eval_logits, logits(without, "roberta", params, train=False))
    one = logits(with_dropout, "roberta", params, train=True, dropout_rng=jax.random.key(1))
    two = logits(with_dropout, "roberta", params, train=True, dropout_rng=jax.random.key(2))
    assert not np.allclose(one, two) and not np.allclose(one, eval_logits)
    np.testing.assert_array_equal(
        logits(without, "roberta", params, train=True, dropout_rng=jax.random.key(1)), eval_logits
    )


def test_paper_parameter_ratios_on_roberta_base_and_vit_base():
    def adapter_count(model, config):
        adapted = cdvft_jax.inject(model, config)
        return sum(adapted.method.num_params(a.d_in, a.d_out, a.config, p) for p, a in adapted.layers.items())

    roberta = FlaxRobertaForSequenceClassification(RobertaConfig(), _do_init=False)
    cdvft, lora8 = adapter_count(roberta, CDVFTConfig()), adapter_count(roberta, LoRAConfig(rank=8))
    assert (cdvft, lora8) == (55_296, 294_912)
    assert round(lora8 / cdvft, 2) == 5.33
    vit = FlaxViTForImageClassification(ViTConfig(), _do_init=False)
    cdvft, lora16 = adapter_count(vit, CDVFTConfig()), adapter_count(vit, LoRAConfig(rank=16))
    assert (cdvft, lora16) == (55_296, 589_824)
    assert round(lora16 / cdvft, 2) == 10.67
    assert adapter_count(roberta, VeRAConfig(rank=1024)) == 24 * (1024 + 768)  # VeRA paper: 43k
    assert adapter_count(roberta, FourierFTConfig(n_frequency=1000)) == 24_000  # FourierFT paper: 24k


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LoRAConfig(rank=0), "rank must be a positive int"),
        (lambda: LoRAConfig(rank=2.0), "rank must be a positive int"),
        (lambda: LoRAConfig(dropout=1.0), r"dropout must be a number in \[0, 1\)"),
        (lambda: VeRAConfig(d_initial=float("inf")), "d_initial must be a finite number, got inf"),
        (lambda: VeRAConfig(rank=-1), "rank must be a positive int"),
        (lambda: VeRAConfig(projection_seed="x"), "projection_seed must be an int"),
        (lambda: FourierFTConfig(n_frequency=0), "n_frequency must be a positive int"),
        (lambda: FourierFTConfig(init="ones"), "init must be one of"),
        (lambda: C3AConfig(block_size=0), "block_size must be a positive int or None"),
        (lambda: C3AConfig(init=True), "init must be one of"),
        (lambda: LoRAConfig(overrides={"query": {"rank": 0}}), "rank must be a positive int"),
    ],
)
def test_bad_configs_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_c3a_block_size_that_does_not_divide_a_layer_is_named_with_the_valid_sizes():
    model = make_model("roberta")
    with pytest.raises(
        ValueError,
        match=r"layer 'roberta/encoder/layer/0/attention/self/query'.*block_size=5.*"
        r"valid block sizes: \[1, 2, 4, 8, 16, 32\]",
    ):
        cdvft_jax.inject(model, C3AConfig(block_size=5))


@pytest.mark.parametrize("init", ["xavier_uniform", "kaiming_uniform", "gaussian"])
def test_c3a_inits_draw_from_peft_s_distributions(init):
    """peft's bounds: xavier ``sqrt(6 / (d_in + d_out))``, kaiming ``sqrt(1 / d_in)``; gaussian N(0, 1)."""
    d_in, d_out = 64, 192
    kernel = np.asarray(C3A.init(jax.random.key(0), d_in, d_out, C3AConfig(block_size=16, init=init))["c3a_kernel"])
    assert kernel.shape == (12, 4, 16)
    if init == "gaussian":
        assert abs(kernel.mean()) < 0.1 and 0.9 < kernel.std() < 1.1
    else:
        bound = (6 / (d_in + d_out)) ** 0.5 if init == "xavier_uniform" else (1 / d_in) ** 0.5
        assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
        assert 0.9 < kernel.std() / (bound / 3**0.5) < 1.1  # a uniform's std


def test_c3a_matches_peft_s_c3a_layer_in_pytorch():
    """The peer implementation: peft's ``C3ALinear`` with our kernel gives our delta and our dW."""
    import peft
    import torch

    d_in, d_out, b = 24, 40, 8
    config = C3AConfig(block_size=b, init="gaussian")
    leaves = C3A.init(jax.random.key(0), d_in, d_out, config)
    base = torch.nn.Sequential()
    base.add_module("query", torch.nn.Linear(d_in, d_out, bias=False))
    torch.nn.init.zeros_(base.query.weight)  # the module's output is then the delta alone
    wrapped = peft.get_peft_model(base, peft.C3AConfig(block_size=b, target_modules=["query"]))
    layer = wrapped.base_model.model.query
    with torch.no_grad():
        layer.c3a_kernel["default"].copy_(torch.from_numpy(np.array(leaves["c3a_kernel"])))
    x = np.random.default_rng(1).standard_normal((3, d_in)).astype(np.float32)
    with torch.no_grad():
        theirs = layer(torch.from_numpy(x)).numpy()
        their_weight = layer.get_delta_weight("default").numpy()
    ours = np.asarray(C3A.delta(leaves, jnp.asarray(x), d_out, config, None))
    assert np.abs(theirs).max() > 0.1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
    np.testing.assert_allclose(np.asarray(C3A.delta_weight(leaves, d_in, d_out, config)), their_weight.T, atol=1e-6)


def test_a_layer_too_small_for_n_frequency_is_named():
    model = make_model("roberta")
    with pytest.raises(ValueError, match=r"layer 'roberta/encoder/layer/0/attention/self/query' \(32 x 32\)"):
        cdvft_jax.inject(model, FourierFTConfig(n_frequency=32 * 32 + 1))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_round_trip_through_json_and_refuse_another_method(name):
    config = CONFIGS[name](modules_to_save=["classifier"], overrides={".*layer/1/.*": {"alpha": 3.0}})
    assert cdvft_jax.config_from_json(config.to_json()) == config
    assert type(config).from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="expected a 'cdvft' config"):
        CDVFTConfig.from_json(config.to_json())


class TwoDense(nn.Module):
    """``b(a(x))``: two Dense layers of different shapes, for merge against an explicit computation."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(24, name="b")(nn.Dense(16, name="a")(x))


def cdvft_reference(p, d_in, d_out, c):
    from test_cdv import dense_reference

    return dense_reference([p["cdv_a_in"], p["cdv_a_out"]], [p["cdv_c"]])


MERGE_CASES = {
    "cdvft": (cdvft_jax.CDVFT, CDVFTConfig(target_modules=["a", "b"], alpha=0.5), cdvft_reference),
    **{
        name: (method, dataclasses.replace(config, target_modules=["a", "b"]), reference)
        for name, (method, config, reference) in REFERENCES.items()
    },
}


@pytest.mark.parametrize("name", sorted(MERGE_CASES))
def test_merged_and_adapted_outputs_equal_x_w_plus_b_plus_scaled_delta_with_per_layer_alpha(name):
    """y = x @ W + b + s * x @ dW per layer, in float64, with s from the method (LoRA: alpha / rank) and
    layer ``b``'s alpha overridden: the adapted module and the plain module on merged kernels both give it."""
    method, config, reference = MERGE_CASES[name]
    config = dataclasses.replace(config, overrides={"b": {"alpha": 3.0}})
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    module = TwoDense()
    base = module.init(jax.random.key(0), x)["params"]
    adapted = cdvft_jax.inject(module, config, x)
    flat = flat_params(adapted.init(jax.random.key(1), base))
    for layer, (d_in, d_out) in {"a": (8, 16), "b": (16, 24)}.items():
        layer_config = adapted.layers[layer].config
        for leaf, value in random_leaves(method, layer_config, d_in, d_out, seed=ord(layer)).items():
            if leaf not in method.frozen_leaves:
                flat[f"{layer}/{leaf}"] = value
    params = unflat_params(flat)

    def scale(layer_alpha, layer_config):
        return layer_alpha / layer_config.rank if name == "lora" else layer_alpha

    h = x.astype(F64)
    for layer, (d_in, d_out), alpha in (("a", (8, 16), config.alpha), ("b", (16, 24), 3.0)):
        leaves = {n: np.asarray(flat[f"{layer}/{n}"], F64) for n in adapted.layers[layer].param_shapes}
        delta_w = reference(leaves, d_in, d_out, adapted.layers[layer].config)
        kernel, bias = (np.asarray(flat[f"{layer}/{n}"], F64) for n in ("kernel", "bias"))
        h = h @ kernel + bias + scale(alpha, adapted.layers[layer].config) * (h @ delta_w)
    expected = h
    tolerance = 2e-5 * np.abs(expected).max()
    np.testing.assert_allclose(adapted(jnp.asarray(x), params=params), expected, rtol=0, atol=tolerance)
    merged = adapted.merge(params)
    np.testing.assert_allclose(module.apply({"params": merged}, x), expected, rtol=0, atol=tolerance)
    # The override matters: with layer b at the base alpha the output is measurably different.
    same_alpha = dataclasses.replace(config, overrides={})
    plain = cdvft_jax.inject(module, same_alpha, x)
    assert np.abs(np.asarray(plain(jnp.asarray(x), params=params)) - expected).max() > 100 * tolerance


def test_merge_and_unmerge_of_bfloat16_kernels_round_once_and_keep_the_dtype():
    """Folding happens in float32 and the result is rounded to the kernel's bfloat16 once: every merged
    weight is within one bfloat16 rounding (2**-8 relative) of the float64 ``W + s * dW``, and unmerging
    comes back to W within two roundings."""
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    module = TwoDense()
    base = jax.tree.map(lambda a: a.astype(jnp.bfloat16), module.init(jax.random.key(0), x)["params"])
    config = CDVFTConfig(target_modules=["a", "b"], alpha=0.5)
    adapted = cdvft_jax.inject(module, config, x)
    flat = flat_params(adapted.init(jax.random.key(1), base))
    for layer, (d_in, d_out) in {"a": (8, 16), "b": (16, 24)}.items():
        leaves = random_leaves(cdvft_jax.CDVFT, adapted.layers[layer].config, d_in, d_out, seed=ord(layer))
        flat.update({f"{layer}/{name}": value for name, value in leaves.items()})
    params = unflat_params(flat)
    merged = flat_params(adapted.merge(params))
    unmerged = flat_params(adapted.unmerge(adapted.merge(params), adapted.adapter_params(params)))
    for layer in ("a", "b"):
        kernel = np.asarray(flat[f"{layer}/kernel"], F64)
        leaves = {n: np.asarray(flat[f"{layer}/{n}"], F64) for n in adapted.layers[layer].param_shapes}
        expected = kernel + 0.5 * cdvft_reference(leaves, *kernel.shape, config)
        got = merged[f"{layer}/kernel"]
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, F64), expected, rtol=2.0**-8, atol=1e-30)
        assert np.abs(np.asarray(got, F64) - kernel).max() > 10 * 2.0**-8 * np.abs(kernel).max()  # dW shows
        back = unmerged[f"{layer}/kernel"]
        assert back.dtype == jnp.bfloat16
        scale = np.abs(expected).max()
        np.testing.assert_allclose(np.asarray(back, F64), kernel, rtol=0, atol=2 * 2.0**-8 * scale)


def test_the_registry_states_each_method_once_and_refuses_bad_entries():
    from cdvft_jax.methods import MethodSpec, SizeSetting, register

    assert cdvft_jax.method_names() == ("cdvft", "lora", "vera", "fourierft", "c3a")
    lora = cdvft_jax.method_spec("lora")
    assert (lora.method, lora.config_class, lora.default("rank")) == (LORA, LoRAConfig, 8)
    assert cdvft_jax.method_spec("fourierft").paper_settings["roberta-base"] == {"n_frequency": 1000, "alpha": 150.0}
    with pytest.raises(
        ValueError, match=r"unknown adapter method 'dora'; known methods: \['c3a', 'cdvft', 'fourierft'"
    ):
        cdvft_jax.method_spec("dora")
    with pytest.raises(ValueError, match=r"LoRAConfig\.method is 'lora', not 'lora2'"):
        register(MethodSpec(LORA._replace(name="lora2"), LoRAConfig))
    with pytest.raises(ValueError, match=r"lora: sizes \['width'\] are not fields of LoRAConfig"):
        register(MethodSpec(LORA, LoRAConfig, sizes=(SizeSetting("width", "how wide"),)))
    with pytest.raises(ValueError, match="adapter method 'lora' is already registered"):
        register(MethodSpec(LORA._replace(learning_rate=1.0), LoRAConfig))
    assert cdvft_jax.method_spec("lora") is lora  # nothing above changed the registry
    # The programs' size settings (fields, hence flags) come from the registry, with each method's default.
    from train.loop import TrainSettings, size_helps

    helps = size_helps()
    assert helps["rank"] == (
        "lora: the rank r of dW = A @ B (default 8); vera: the rank of the shared random projections (default 256)"
    )
    assert helps["n_frequency"] == "fourierft: spectral coefficients per layer (default 1000)"
    assert (
        helps["block_size"].startswith("cdvft: circulant block size p")
        and "; c3a: circulant block size b" in helps["block_size"]
    )
    assert {"block_size", "rank", "n_frequency"} <= {f.name for f in dataclasses.fields(TrainSettings)}
