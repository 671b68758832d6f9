"""Many adapters in one batch (``stack_adapters`` + ``adapter_ids``): each row equals its adapter run alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HEAD, make_inputs, make_model, trained_like

import cdvft_jax
from cdvft_jax.params import flat_params, merge_params, unflat_params

CONFIGS = {
    "cdvft": lambda **kw: cdvft_jax.CDVFTConfig(**kw),
    "cdvft_blocks": lambda **kw: cdvft_jax.CDVFTConfig(block_size=8, num_factors=3, **kw),
    "lora": lambda **kw: cdvft_jax.LoRAConfig(rank=4, alpha=8.0, dropout=0.1, **kw),
    "vera": lambda **kw: cdvft_jax.VeRAConfig(rank=8, **kw),
    "fourierft": lambda **kw: cdvft_jax.FourierFTConfig(n_frequency=50, alpha=40.0, **kw),
    "c3a": lambda **kw: cdvft_jax.C3AConfig(block_size=8, alpha=20.0, **kw),
}
IDS = [2, -1, 0, 1, 2]


def setup(family, method, count=3):
    model = make_model(family)
    adapted = cdvft_jax.inject(model, CONFIGS[method](modules_to_save=[HEAD[family]]))
    trainable, frozen = adapted.split(adapted.init(jax.random.key(0), model.params))
    adapters = [trained_like(trainable, seed) for seed in range(count)]
    return model, adapted, frozen, adapters


@pytest.mark.parametrize("method", list(CONFIGS))
def test_each_row_of_a_mixed_batch_equals_its_adapter_alone_and_base_rows_the_base_model(family, method):
    model, adapted, frozen, adapters = setup(family, method)
    inputs, _ = make_inputs(family, batch=len(IDS))
    stacked = merge_params(cdvft_jax.stack_adapters(adapted, adapters), frozen)

    mixed = adapted(**inputs, params=stacked, adapter_ids=jnp.array(IDS)).logits
    jitted = jax.jit(lambda p, ids: adapted(**inputs, params=p, adapter_ids=ids).logits)(stacked, jnp.array(IDS))
    alone = [adapted(**inputs, params=merge_params(a, frozen)).logits for a in adapters]
    # The base model, run without interception, with adapter 0's head in place of its own.
    heads = {p: v for p, v in flat_params(adapters[0]).items() if not adapted.is_adapter_leaf(p)}
    base = model(**inputs, params=unflat_params({**flat_params(model.params), **heads})).logits
    tolerance = 1e-5 * float(jnp.max(jnp.abs(jnp.stack(alone))))
    for row, adapter in enumerate(IDS):
        expected = base[row] if adapter == -1 else alone[adapter][row]
        np.testing.assert_allclose(mixed[row], expected, rtol=0, atol=tolerance, err_msg=f"row {row}")
        np.testing.assert_allclose(jitted[row], expected, rtol=0, atol=tolerance, err_msg=f"row {row} (jit)")
    # The adapters move these rows by far more than the tolerance, so a row reading another adapter (or
    # a base row reading one) would fail above.
    assert float(jnp.max(jnp.abs(alone[0][0] - alone[2][0]))) > 100 * tolerance
    assert float(jnp.max(jnp.abs(alone[0][1] - base[1]))) > 100 * tolerance


def test_one_stacked_adapter_reproduces_the_adapter_and_stacking_keeps_order():
    _, adapted, frozen, adapters = setup("roberta", "cdvft", count=2)
    stacked = cdvft_jax.stack_adapters(adapted, adapters)
    for path, leaf in flat_params(stacked).items():
        for number, adapter in enumerate(adapters):
            np.testing.assert_array_equal(leaf[number], flat_params(adapter)[path], err_msg=path)
    inputs, _ = make_inputs("roberta", batch=4)
    one = merge_params(cdvft_jax.stack_adapters(adapted, adapters[1:]), frozen)
    got = adapted(**inputs, params=one, adapter_ids=jnp.zeros(4, jnp.int32)).logits
    want = adapted(**inputs, params=merge_params(adapters[1], frozen)).logits
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_ids_out_of_range_are_errors_and_never_clamped_under_jit():
    _, adapted, frozen, adapters = setup("bert", "cdvft", count=2)
    inputs, _ = make_inputs("bert", batch=3)
    stacked = merge_params(cdvft_jax.stack_adapters(adapted, adapters), frozen)
    for bad in ([0, 2, 1], [0, -2, 1]):
        with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 2\) \(-1: the base model\)"):
            adapted(**inputs, params=stacked, adapter_ids=jnp.array(bad))
    with pytest.raises(ValueError, match=r"adapter_ids must be a 1-D integer array .* got float32\[3\]"):
        adapted(**inputs, params=stacked, adapter_ids=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"adapter_ids has 2 ids but layer .* sees an input of shape"):
        adapted(**inputs, params=stacked, adapter_ids=jnp.array([0, 1]))
    run = jax.jit(lambda ids: adapted(**inputs, params=stacked, adapter_ids=ids).logits)
    for bad in (2, -2):
        logits = run(jnp.array([0, bad, 1]))
        assert bool(jnp.all(jnp.isnan(logits[1]))), "an id out of range must not read another adapter"
        assert bool(jnp.all(jnp.isfinite(logits[jnp.array([0, 2])])))


def test_unstacked_params_or_a_bad_stack_are_refused_naming_the_problem():
    model, adapted, frozen, adapters = setup("roberta", "lora", count=2)
    inputs, _ = make_inputs("roberta", batch=2)
    with pytest.raises(ValueError, match=r"adapter_ids needs stacked adapters \(stack_adapters\): .* expected \(N, "):
        adapted(**inputs, params=merge_params(adapters[0], frozen), adapter_ids=jnp.array([0, 0]))
    with pytest.raises(ValueError, match="needs at least one adapter"):
        cdvft_jax.stack_adapters(adapted, [])
    flat = flat_params(adapters[1])
    dropped = next(iter(flat))
    partial = unflat_params({p: v for p, v in flat.items() if p != dropped})
    with pytest.raises(ValueError, match=rf"adapter 1 is not a trainable tree .* lacks \[{dropped!r}\]"):
        cdvft_jax.stack_adapters(adapted, [adapters[0], partial])
    other = cdvft_jax.inject(model, cdvft_jax.LoRAConfig(rank=2, alpha=8.0, modules_to_save=["classifier"]))
    smaller, _ = other.split(other.init(jax.random.key(0), model.params))
    with pytest.raises(
        ValueError, match=r"adapter 1: .*lora_a' has shape \(32, 2\), this adapted model's is \(32, 4\)"
    ):
        cdvft_jax.stack_adapters(adapted, [adapters[0], smaller])


def test_adapter_difference_names_what_keeps_two_adapters_out_of_one_stack():
    model = make_model("bert")
    base = cdvft_jax.inject(model, cdvft_jax.CDVFTConfig(modules_to_save=["classifier"]))
    assert cdvft_jax.adapter_difference(base, cdvft_jax.inject(model, base.config)) is None
    cases = [
        (cdvft_jax.LoRAConfig(modules_to_save=["classifier"]), "adapter config differs in method: 'cdvft' vs 'lora'"),
        (
            cdvft_jax.CDVFTConfig(target_modules=["query"], modules_to_save=["classifier"]),
            "target_modules: ['query', 'value'] vs ['query']",
        ),
        (cdvft_jax.CDVFTConfig(), "modules_to_save: ['classifier'] vs []"),
    ]
    for config, message in cases:
        assert message in cdvft_jax.adapter_difference(base, cdvft_jax.inject(model, config))
    roberta = cdvft_jax.inject(make_model("roberta"), base.config)
    assert cdvft_jax.adapter_difference(base, roberta) == (
        "base model class differs: FlaxBertForSequenceClassification vs FlaxRobertaForSequenceClassification"
    )


def test_a_head_with_other_than_dense_layers_is_refused():
    model = make_model("bert")
    config = cdvft_jax.CDVFTConfig(modules_to_save=["classifier", "embeddings/LayerNorm"])
    adapted = cdvft_jax.inject(model, config)
    trainable, frozen = adapted.split(adapted.init(jax.random.key(0), model.params))
    stacked = merge_params(cdvft_jax.stack_adapters(adapted, [trainable]), frozen)
    inputs, _ = make_inputs("bert", batch=2)
    with pytest.raises(ValueError, match=r"per-row heads made of nn.Dense layers only; .*LayerNorm/(scale|bias)"):
        adapted(**inputs, params=stacked, adapter_ids=jnp.array([0, 0]))


def test_adapter_dropout_in_a_stacked_call_is_refused_rather_than_dropped():
    _, adapted, frozen, adapters = setup("bert", "lora", count=2)
    inputs, _ = make_inputs("bert", batch=2)
    stacked = merge_params(cdvft_jax.stack_adapters(adapted, adapters), frozen)
    with pytest.raises(ValueError, match=r"stacked adapters run deterministically .* call the model with train=False"):
        adapted(**inputs, params=stacked, adapter_ids=jnp.array([0, 1]), train=True, dropout_rng=jax.random.key(1))
