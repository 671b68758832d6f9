"""Injection into unmodified Hugging Face Flax models: identity at init, training, remat, bf16, merge."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    HEAD,
    check_merge_and_unmerge,
    check_training_changes_only_trainable_leaves,
    make_inputs,
    make_model,
)
from transformers import FlaxRobertaForSequenceClassification, RobertaConfig

import cdvft_jax
from cdvft_jax import CDVDense, CDVFTConfig
from cdvft_jax.params import flat_params, unflat_params


def adapt(model, family, **config_kwargs):
    config_kwargs.setdefault("modules_to_save", [HEAD[family]])
    return cdvft_jax.inject(model, CDVFTConfig(**config_kwargs))


def logits(fn, inputs, params, **kwargs):
    return fn(**inputs, params=params, **kwargs).logits


def test_zero_init_gives_the_base_logits_exactly(family):
    model = make_model(family)
    adapted = adapt(model, family)
    params = adapted.init(jax.random.key(0), model.params)
    inputs, _ = make_inputs(family)
    base = logits(model, inputs, model.params)
    np.testing.assert_array_equal(logits(adapted, inputs, params), base)
    # Under jit too: the compiled adapted model equals the compiled base model.
    jitted = jax.jit(lambda p: logits(adapted, inputs, p))
    np.testing.assert_array_equal(jitted(params), jax.jit(lambda p: logits(model, inputs, p))(model.params))
    # The adapter is really there: 2 layers x (query, value) x 3 x 32.
    assert adapted.summary(params).adapter == 2 * 2 * 3 * 32


def _loss_fn(adapted, family):
    def loss_fn(params, batch, rng):
        inputs, labels = batch
        out = logits(adapted, inputs, params)
        return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()

    return loss_fn


def test_training_lowers_the_loss_and_changes_only_trainable_leaves(family):
    model = make_model(family)
    check_training_changes_only_trainable_leaves(adapt(model, family), model, family)


def test_every_vector_gets_gradient_from_the_second_step_on():
    model = make_model("roberta")
    adapted = adapt(model, "roberta")
    params = adapted.init(jax.random.key(0), model.params)
    loss_fn = _loss_fn(adapted, "roberta")
    batch = make_inputs("roberta")
    grad = jax.grad(lambda p: loss_fn(p, batch, None))
    layer = "roberta/encoder/layer/1/attention/self/query"

    first = flat_params(grad(params))
    # a_out's gradient agrees with a central finite difference of the loss along it (no autodiff in the
    # check).  The gradient is ~1e-6, so h must be large for float32's resolution of the loss (~1% at
    # h = 4) yet small for its curvature (h = 20 is 10% off); 3% holds both, and a factor or sign is caught.
    g_out = np.asarray(first[f"{layer}/cdv_a_out"], np.float64)
    direction = g_out / np.linalg.norm(g_out)

    def loss_along(h):
        flat = flat_params(params)
        flat[f"{layer}/cdv_a_out"] = jnp.asarray(h * direction, jnp.float32)
        return float(loss_fn(unflat_params(flat), batch, None))

    h = 4.0
    finite_difference = (loss_along(h) - loss_along(-h)) / (2 * h)
    assert finite_difference == pytest.approx(np.linalg.norm(g_out), rel=3e-2)
    assert np.abs(first[f"{layer}/cdv_a_in"]).max() == 0  # a_out = 0 blocks them at step 0
    assert np.abs(first[f"{layer}/cdv_c"]).max() == 0

    stepped = jax.tree.map(lambda p, g: p - 0.1 * g, params, grad(params))
    second = flat_params(grad(stepped))
    for name in ("cdv_a_in", "cdv_c", "cdv_a_out"):
        assert np.all(second[f"{layer}/{name}"] != 0), name


@pytest.mark.parametrize("family", ["roberta", "bert"])  # HF's Flax ViT has no remat option
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(family):
    model = make_model(family)
    adapted = adapt(model, family, init="random", alpha=0.5)
    params = adapted.init(jax.random.key(1), model.params)
    remat_model = make_model(family)
    remat_model.enable_gradient_checkpointing()
    remat_adapted = adapt(remat_model, family, init="random", alpha=0.5)
    assert set(remat_adapted.layers) == set(adapted.layers)
    trainable, frozen = adapted.split(params)
    batch = make_inputs(family)

    def grads(a):
        loss = _loss_fn(a, family)
        return jax.jit(jax.value_and_grad(lambda t: loss(cdvft_jax.merge_params(t, frozen), batch, None)))(trainable)

    # Remat is really on: the gradient of the remat model holds checkpoint primitives, the plain one none.
    def remat_primitives(a):
        loss = _loss_fn(a, family)
        jaxpr = jax.make_jaxpr(jax.grad(lambda t: loss(cdvft_jax.merge_params(t, frozen), batch, None)))(trainable)
        return sum(eqn.primitive.name in ("checkpoint", "remat2") for eqn in _all_eqns(jaxpr.jaxpr))

    assert remat_primitives(remat_adapted) == remat_model.config.num_hidden_layers  # one per layer
    assert remat_primitives(adapted) == 0
    (loss, g), (remat_loss, remat_g) = grads(adapted), grads(remat_adapted)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(remat_g), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_the_fft_branch_and_vectors_in_float32():
    model = make_model("roberta", dtype=jnp.bfloat16)
    adapted = adapt(model, "roberta", init="random", alpha=5.0)
    params = adapted.init(jax.random.key(0), model.params)
    for path, leaf in flat_params(adapted.adapter_params(params)).items():
        assert leaf.dtype == jnp.float32, path
    inputs, labels = make_inputs("roberta")
    out = logits(adapted, inputs, params)
    assert out.dtype == jnp.bfloat16

    trainable, frozen = adapted.split(params)
    loss_fn = _loss_fn(adapted, "roberta")
    objective = lambda t: loss_fn(cdvft_jax.merge_params(t, frozen), (inputs, labels), None)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(objective))(trainable)
    fft_dtypes = {
        str(var.aval.dtype) for eqn in _all_eqns(jaxpr.jaxpr) if eqn.primitive.name == "fft" for var in eqn.invars
    }
    assert fft_dtypes and fft_dtypes <= {"float32", "complex64"}, fft_dtypes
    grads = jax.grad(objective)(trainable)
    for path, g in flat_params(grads).items():
        assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))), path

    # The bf16 model tracks the float32 adapted model to bf16 accuracy (3 bf16 roundings at the logits'
    # scale; measured: 1.5e-4 at a scale of 0.026), and the adapter moves the logits far more than that,
    # so a bf16 path that dropped or mangled the delta would fail.
    float32_model = make_model("roberta")
    reference = np.asarray(logits(adapt(float32_model, "roberta", init="random", alpha=5.0), inputs, params))
    tolerance = 3 * 2.0**-8 * float(np.max(np.abs(reference)))
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, rtol=0, atol=tolerance)
    base = np.asarray(float32_model(**inputs, params=float32_model.params).logits)
    assert float(np.max(np.abs(reference - base))) > 10 * tolerance


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


def test_merged_model_gives_the_adapted_outputs_and_unmerge_restores(family):
    model = make_model(family)
    adapted = adapt(model, family, init="random", alpha=2.0)
    check_merge_and_unmerge(adapted, model, adapted.init(jax.random.key(2), model.params), family)


def test_non_square_layers_five_factors_and_per_layer_overrides():
    model = make_model("bert")
    adapted = cdvft_jax.inject(
        model,
        CDVFTConfig(
            target_modules=["intermediate/dense", "output/dense", "query"],
            exclude_modules=["attention/output/dense"],
            modules_to_save=["classifier"],
            num_factors=5,
            init="random",
            alpha=0.2,
            overrides={r".*layer/1/output/dense": {"block_size": 8, "num_factors": 3}},
        ),
    )
    shapes = {p: layer.param_shapes for p, layer in adapted.layers.items()}
    assert "bert/encoder/layer/0/attention/output/dense" not in shapes
    assert shapes["bert/encoder/layer/0/intermediate/dense"]["cdv_c"] == (2, 1, 32)
    assert shapes["bert/encoder/layer/0/intermediate/dense"]["cdv_c2"] == (2, 2, 32)
    assert shapes["bert/encoder/layer/0/output/dense"]["cdv_c"] == (1, 2, 32)
    assert shapes["bert/encoder/layer/1/output/dense"] == {"cdv_a_in": (64,), "cdv_a_out": (32,), "cdv_c": (4, 8, 8)}
    params = adapted.init(jax.random.key(3), model.params)
    inputs, _ = make_inputs("bert")
    expected = logits(adapted, inputs, params)
    np.testing.assert_allclose(
        logits(model, inputs, adapted.merge(params)), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
    )


def test_roberta_base_query_value_has_55296_parameters():
    model = FlaxRobertaForSequenceClassification(RobertaConfig(), _do_init=False)
    adapted = cdvft_jax.inject(model, CDVFTConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    shapes = jax.eval_shape(adapted.init_adapter, jax.random.key(0))
    assert cdvft_jax.count_params(shapes) == 55_296
    assert len(adapted.layers) == 24


def test_describe_and_summary_report_what_matched():
    model = make_model("roberta")
    adapted = adapt(model, "roberta", exclude_modules=[r"layer/1/attention/self/value"])
    table = adapted.describe()
    assert "roberta/encoder/layer/0/attention/self/query    dense  32 x 32       adapted (96 params)" in table
    assert "roberta/encoder/layer/1/attention/self/value    dense  32 x 32       excluded" in table
    assert "classifier/out_proj                             dense  32 x 3        in modules_to_save" in table
    params = adapted.init(jax.random.key(0), model.params)
    summary = adapted.summary(params)
    assert summary.adapter == 3 * 96
    assert summary.modules_to_save == 32 * 32 + 32 + 32 * 3 + 3
    assert summary.total == cdvft_jax.count_params(params)
    assert "trainable params: 1,443" in str(summary)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(target_modules=["qeury", "value"]), ValueError, r"'qeury' matches no linear layer.*self/query"),
        (dict(target_modules=r".*/nothing"), ValueError, r"matches no linear layer"),
        (dict(target_modules=["query"], exclude_modules=["query"]), ValueError, "excluded by exclude_modules"),
        (dict(exclude_modules=["key"]), ValueError, "exclude_modules entry 'key' excludes none of the layers"),
        (dict(exclude_modules=r".*layer/9/.*"), ValueError, r"entry '\.\*layer/9/\.\*' excludes none"),
        (
            dict(overrides={r".*layer/7/.*": {"alpha": 2.0}}),
            ValueError,
            r"overrides pattern '\.\*layer/7/\.\*' matches no adapted layer; the adapted layers are: roberta/",
        ),
        (dict(overrides={r".*key": {"alpha": 2.0}}), ValueError, "matches no adapted layer"),
        (dict(target_modules=["dense"], modules_to_save=["classifier"]), ValueError, "lie inside modules_to_save"),
        (dict(modules_to_save=["clasifier"]), ValueError, "'clasifier' matches no module"),
        (
            dict(target_modules=["intermediate/dense"], block_size=5),
            ValueError,
            r"'roberta/encoder/layer/0/intermediate/dense' of shape \(d_in=32, d_out=64\).*\[1, 2, 4, 8, 16, 32\]",
        ),
        (
            dict(target_modules=["intermediate/dense"], num_factors=1),
            ValueError,
            r"intermediate/dense' of shape \(d_in=32, d_out=64\): num_factors=1",
        ),
    ],
)
def test_bad_configs_for_a_model_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        cdvft_jax.inject(make_model("roberta"), CDVFTConfig(**kwargs))


def test_misuse_raises_clear_errors():
    model = make_model("roberta")
    adapted = adapt(model, "roberta")
    inputs, _ = make_inputs("roberta")
    with pytest.raises(ValueError, match="is adapted but its params have no"):
        logits(adapted, inputs, model.params)
    params = adapted.init(jax.random.key(0), model.params)
    with pytest.raises(ValueError, match="already hold adapter leaves"):
        adapted.init(jax.random.key(0), params)
    other = make_model("bert")
    with pytest.raises(ValueError, match="base params do not fit the injected model"):
        adapted.init(jax.random.key(0), other.params)
    with pytest.raises(ValueError, match="cannot fold layer"):
        adapted.merge(model.params)
    with pytest.raises(TypeError, match=r"expected a Hugging Face Flax model or a flax\.linen\.Module"):
        cdvft_jax.inject(object(), CDVFTConfig())
    with pytest.raises(ValueError, match="needs sample inputs"):
        cdvft_jax.inject(nn.Dense(4), CDVFTConfig())


class TinyNet(nn.Module):
    """A user's own model: one plain Dense to inject into and one CDVDense."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name="query")(x))
        h = CDVDense(16, block_size=4, name="mixer")(h)
        return nn.Dense(3, name="head")(h)


def test_linen_modules_and_cdv_dense():
    net = TinyNet()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 16)), jnp.float32)
    variables = net.init(jax.random.key(0), x)
    mixer = variables["params"]["mixer"]
    assert set(mixer) == {"kernel", "bias", "cdv_a_in", "cdv_c", "cdv_a_out"}
    assert mixer["cdv_c"].shape == (4, 4, 4)
    # CDVDense at zero init computes exactly its nn.Dense.
    h = jnp.ones((2, 16))
    plain = nn.Dense(16).apply({"params": {"kernel": mixer["kernel"], "bias": mixer["bias"]}}, h)
    np.testing.assert_array_equal(CDVDense(16, block_size=4).apply({"params": mixer}, h), plain)

    adapted = cdvft_jax.inject(net, CDVFTConfig(target_modules=r".*", exclude_modules=["head"]), x)
    assert list(adapted.layers) == ["query"]  # CDVDense carries its own adapter
    params = adapted.init(jax.random.key(1), variables["params"])
    np.testing.assert_array_equal(adapted(x, params=params), net.apply(variables, x))
