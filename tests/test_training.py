"""Trainable-only training: learning-rate groups, the single-tree variant, and no frozen weight gradients."""

import re

import jax
import numpy as np
import optax
import pytest
from conftest import make_inputs, make_model

import cdvft_jax
from cdvft_jax import CDVFTConfig
from cdvft_jax.params import flat_params, unflat_params


@pytest.fixture(scope="module")
def setup():
    model = make_model("roberta")
    adapted = cdvft_jax.inject(model, CDVFTConfig(modules_to_save=["classifier"]))
    params = adapted.init(jax.random.key(0), model.params)
    batch = make_inputs("roberta")

    def loss_fn(params, batch, rng):
        inputs, labels = batch
        out = adapted(**inputs, params=params).logits
        return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()

    def plain_loss_fn(params, batch, rng):
        inputs, labels = batch
        out = model(**inputs, params=params).logits
        return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()

    return model, adapted, params, batch, loss_fn, plain_loss_fn


def test_adapter_and_head_get_their_own_learning_rates(setup):
    _, adapted, params, batch, loss_fn, _ = setup
    trainable, frozen = adapted.split(params)
    optimizer = cdvft_jax.adapter_optimizer(adapted, adapter_learning_rate=1e-1, head_learning_rate=1e-3, eps=1e-15)
    state = cdvft_jax.init_train_state(trainable, optimizer)
    step = cdvft_jax.make_train_step(loss_fn, optimizer)
    new_state, _ = step(state, frozen, batch, jax.random.key(0))
    before, after = flat_params(trainable), flat_params(new_state.trainable)
    # Adam's first update is lr * g / (|g| + eps): with a negligible eps every entry moves by lr.
    adapter_move = np.abs(
        after["roberta/encoder/layer/0/attention/self/query/cdv_a_out"]
        - before["roberta/encoder/layer/0/attention/self/query/cdv_a_out"]
    )
    head_move = np.abs(after["classifier/out_proj/kernel"] - before["classifier/out_proj/kernel"])
    np.testing.assert_allclose(adapter_move.max(), 1e-1, rtol=1e-3)
    np.testing.assert_allclose(head_move.max(), 1e-3, rtol=1e-3)
    assert int(new_state.step) == 1


def test_single_tree_optimizer_matches_split_trees_and_keeps_frozen_leaves(setup):
    _, adapted, params, batch, loss_fn, _ = setup
    kwargs = dict(
        adapter_learning_rate=5e-2, head_learning_rate=5e-3, weight_decay=0.01, max_grad_norm=0.5, total_steps=4
    )
    trainable, frozen = adapted.split(params)
    split_opt = cdvft_jax.adapter_optimizer(adapted, **kwargs)
    split_state = cdvft_jax.init_train_state(trainable, split_opt)
    split_step = cdvft_jax.make_train_step(loss_fn, split_opt)

    single_opt = cdvft_jax.single_tree_optimizer(adapted, **kwargs)
    single_state = cdvft_jax.init_train_state(params, single_opt)
    single_step = cdvft_jax.make_train_step(loss_fn, single_opt)
    for k in range(3):
        split_state, split_metrics = split_step(split_state, frozen, batch, jax.random.key(k))
        single_state, single_metrics = single_step(single_state, {}, batch, jax.random.key(k))
        np.testing.assert_allclose(single_metrics["loss"], split_metrics["loss"], rtol=1e-6)

    single = flat_params(single_state.trainable)
    split = flat_params(cdvft_jax.merge_params(split_state.trainable, frozen))
    original = flat_params(params)
    for path, value in single.items():
        if adapted.is_trainable(path):
            np.testing.assert_allclose(value, split[path], rtol=1e-5, atol=1e-7, err_msg=path)
        else:
            np.testing.assert_array_equal(value, original[path], err_msg=path)


def _dot_count(step, *args) -> int:
    """Matrix multiplications left in the optimised executable of ``step``."""
    return len(re.findall(r"\bdot\(", step.lower(*args).compile().as_text()))


def test_no_frozen_weight_gradient_is_computed(setup):
    """The split-tree step has no more matmuls than the floor; the documented trap has as many as full FT."""
    model, adapted, params, batch, loss_fn, plain_loss_fn = setup
    rng = jax.random.key(0)
    adam = optax.adam(1e-3)

    def count(loss, optimizer, trainable, frozen):
        state = cdvft_jax.init_train_state(trainable, optimizer)
        return _dot_count(cdvft_jax.make_train_step(loss, optimizer, donate=False), state, frozen, batch, rng)

    full = count(plain_loss_fn, adam, model.params, {})
    floor = count(
        plain_loss_fn,
        adam,
        *cdvft_jax.split_params(model.params, lambda p: p.startswith(("classifier", "roberta/embeddings/LayerNorm"))),
    )
    trainable, frozen = adapted.split(params)
    split = count(loss_fn, cdvft_jax.adapter_optimizer(adapted, adapter_learning_rate=1e-2), trainable, frozen)
    single_opt = cdvft_jax.single_tree_optimizer(adapted, adapter_learning_rate=1e-2, max_grad_norm=1.0)
    single = count(loss_fn, single_opt, params, {})
    trap = count(loss_fn, optax.chain(optax.clip_by_global_norm(1.0), single_opt), params, {})

    # Full fine-tuning adds a weight-gradient matmul for every frozen kernel.
    assert full > floor
    assert split <= floor
    assert single == split
    assert trap >= full


def test_frozen_weights_are_an_argument_not_a_compiled_constant(setup):
    _, adapted, params, batch, loss_fn, _ = setup
    trainable, frozen = adapted.split(params)
    optimizer = cdvft_jax.adapter_optimizer(adapted, adapter_learning_rate=1e-2)
    traces = []

    def counted_loss(params, batch, rng):  # Python runs here only while jax traces the step
        traces.append(None)
        return loss_fn(params, batch, rng)

    step = cdvft_jax.make_train_step(counted_loss, optimizer, donate=False)
    state = cdvft_jax.init_train_state(trainable, optimizer)
    _, first = step(state, frozen, batch, jax.random.key(0))
    scaled = jax.tree.map(lambda x: x * 1.5, frozen)
    _, second = step(state, scaled, batch, jax.random.key(0))
    assert float(first["loss"]) != float(second["loss"])
    # One trace (so one executable) serves both frozen trees.  Counted in Python rather than with
    # ``_cache_size()``, which reads jit's C++ fast-path cache: it stayed empty in a full-suite run.
    assert len(traces) == 1


def test_init_train_state_copies_so_donation_spares_the_callers_arrays(setup):
    model, adapted, params, batch, loss_fn, _ = setup
    trainable, frozen = adapted.split(params)
    head_kernel = model.params["classifier"]["out_proj"]["kernel"]
    before = np.array(head_kernel)
    optimizer = cdvft_jax.adapter_optimizer(adapted, adapter_learning_rate=1e-2)
    state = cdvft_jax.init_train_state(trainable, optimizer)
    new_state, _ = cdvft_jax.make_train_step(loss_fn, optimizer)(state, frozen, batch, jax.random.key(0))
    # The step donated (deleted) the state it was given, but not the caller's arrays it was built from:
    # the head arrays shared with model.params are alive and unchanged, while the new state's head moved.
    donated = state.trainable["classifier"]["out_proj"]["kernel"]
    assert donated.is_deleted()
    for leaf in (head_kernel, trainable["classifier"]["out_proj"]["kernel"]):
        assert not leaf.is_deleted()
        np.testing.assert_array_equal(np.asarray(leaf), before)
    assert np.abs(np.asarray(new_state.trainable["classifier"]["out_proj"]["kernel"]) - before).max() > 1e-4


def test_eval_step_merges_the_trees(setup):
    model, _, _, batch, _, _ = setup
    adapted = cdvft_jax.inject(model, CDVFTConfig(modules_to_save=["classifier"], init="random"))
    params = adapted.init(jax.random.key(3), model.params)
    trainable, frozen = adapted.split(params)
    eval_step = cdvft_jax.make_eval_step(lambda p, b: adapted(**b[0], params=p).logits)
    got = eval_step(trainable, frozen, batch)
    # Independently: the unmodified model on kernels with the adapters folded in.
    merged = model(**batch[0], params=adapted.merge(params)).logits
    np.testing.assert_allclose(got, merged, rtol=1e-5, atol=1e-6)
    base = model(**batch[0], params=model.params).logits
    assert np.abs(np.asarray(got) - np.asarray(base)).max() > 100 * 1e-6  # random init moves the logits


def test_the_step_reports_whether_loss_and_updated_weights_are_finite(setup):
    _, adapted, params, batch, loss_fn, _ = setup
    trainable, frozen = adapted.split(params)
    optimizer = cdvft_jax.adapter_optimizer(adapted)
    step = cdvft_jax.make_train_step(loss_fn, optimizer, donate=False)
    state = cdvft_jax.init_train_state(trainable, optimizer)
    _, metrics = step(state, frozen, batch, None)
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    # A finite loss with an infinite gradient: sqrt(b - b) is 0, and its slope at 0 is infinite.

    def loss_with_an_infinite_slope(params, batch, rng):
        bias = params["classifier"]["out_proj"]["bias"][0]
        return loss_fn(params, batch, rng) + jax.numpy.sqrt(bias - jax.lax.stop_gradient(bias))

    _, metrics = cdvft_jax.make_train_step(loss_with_an_infinite_slope, optimizer, donate=False)(
        state, frozen, batch, None
    )
    assert np.isfinite(float(metrics["loss"])) and not bool(metrics["finite"])
    flat = flat_params(trainable)
    leaf = next(p for p in flat if p.endswith("cdv_a_in"))
    flat[leaf] = flat[leaf].at[0].set(np.nan)
    _, metrics = step(cdvft_jax.init_train_state(unflat_params(flat), optimizer), frozen, batch, None)
    assert not bool(metrics["finite"])


def test_the_schedule_warms_up_linearly_then_decays_linearly_to_zero():
    peak, total = 2e-3, 100
    rates = cdvft_jax.warmup_linear_decay(peak, total)  # the default 6%: 6 warm-up steps, then 94 of decay
    expected = {0: 0.0, 3: peak / 2, 6: peak, 53: peak / 2, 99: peak / 94, 100: 0.0}
    for step, rate in expected.items():
        assert float(rates(step)) == pytest.approx(rate, rel=1e-6, abs=1e-12), step
    # Without warm-up the second update is at the peak (one warm-up step, the first update's rate 0, is the minimum).
    assert float(cdvft_jax.warmup_linear_decay(peak, total, warmup_ratio=0.0)(1)) == pytest.approx(peak, rel=1e-6)
    # 6% of 30 steps is 1.8, rounded to 2 warm-up steps (neither truncated to 1 nor rounded up from 1.2).
    assert float(cdvft_jax.warmup_linear_decay(peak, 30)(1)) == pytest.approx(peak / 2, rel=1e-6)
    assert float(cdvft_jax.warmup_linear_decay(peak, 20)(1)) == pytest.approx(peak, rel=1e-6)  # 1.2 -> 1
    assert float(cdvft_jax.warmup_linear_decay(peak, np.int64(30))(2)) == pytest.approx(peak, rel=1e-6)
    for total_steps, ratio in [(0, 0.06), (10.0, 0.06), (10, 1.0), (10, -0.1)]:
        with pytest.raises(ValueError):
            cdvft_jax.warmup_linear_decay(peak, total_steps, ratio)


def test_total_steps_schedules_both_groups_with_the_recipe(setup):
    """With no moment averaging (b1 = b2 = 0) Adam's update is the step's rate times g / |g|, so under a gradient
    of ones each step's update is minus the scheduled rate, checked against the formula written out here."""
    _, adapted, params, _, _, _ = setup
    trainable, _ = adapted.split(params)
    total, warmup, adapter_peak, head_peak = 20, 2, 4e-2, 1e-3
    optimizer = cdvft_jax.adapter_optimizer(
        adapted,
        adapter_learning_rate=adapter_peak,
        head_learning_rate=head_peak,
        total_steps=total,
        warmup_ratio=0.1,
        b1=0.0,
        b2=0.0,
    )
    state = optimizer.init(trainable)
    gradient = jax.tree_util.tree_map(np.ones_like, trainable)
    adapter_leaf, head_leaf = "roberta/encoder/layer/0/attention/self/query/cdv_c", "classifier/out_proj/bias"
    for step in range(total + 2):
        updates, state = optimizer.update(gradient, state, trainable)
        share = step / warmup if step < warmup else max(0.0, 1 - (step - warmup) / (total - warmup))
        for leaf, peak in [(adapter_leaf, adapter_peak), (head_leaf, head_peak)]:
            np.testing.assert_allclose(
                -flat_params(updates)[leaf], peak * share, rtol=1e-5, atol=1e-12, err_msg=f"{leaf}, step {step}"
            )


@pytest.mark.parametrize("rate", ["adapter_learning_rate", "head_learning_rate"])
@pytest.mark.parametrize("optimizer", [cdvft_jax.adapter_optimizer, cdvft_jax.single_tree_optimizer])
def test_total_steps_refuses_a_schedule_as_a_rate(setup, optimizer, rate):
    _, adapted, _, _, _, _ = setup
    with pytest.raises(ValueError, match="give numbers"):
        optimizer(adapted, **{rate: optax.constant_schedule(1e-3)}, total_steps=10)
