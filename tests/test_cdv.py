"""The CDV operator against an independent float64 NumPy reference built from explicit circulants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import cdvft_jax as cdv


def dense_block_circulant(c: np.ndarray) -> np.ndarray:
    """Column-form matrix of a block-circulant: block (i, j) = scipy's circulant of c[i, j]."""
    q_out, q_in, _ = c.shape
    return np.block([[scipy.linalg.circulant(c[i, j]) for j in range(q_in)] for i in range(q_out)])


def dense_reference(diagonals, circulants) -> np.ndarray:
    """(d_in, d_out) float64 Flax-layout weight of D_{m-1} C_{m-1} ... C_1 D_0, each C the top-left
    corner of its block-circulant that fits the diagonals beside it (all of it when p divides both sides)."""
    w = np.diag(np.asarray(diagonals[0], np.float64))
    for d, c in zip(diagonals[1:], circulants, strict=True):
        corner = dense_block_circulant(np.asarray(c, np.float64))[: len(d), : w.shape[0]]
        w = np.diag(np.asarray(d, np.float64)) @ corner @ w
    return w.T


def random_factors(rng, d_in, d_out, p, num_factors):
    shape = cdv.cdv_shape(d_in, d_out, p, num_factors)
    diagonals = [rng.standard_normal(s).astype(np.float32) for s in shape.diagonal_shapes]
    circulants = [rng.standard_normal(s).astype(np.float32) for s in shape.circulant_shapes]
    return diagonals, circulants


# (d_in, d_out, block_size): square one-block, square multi-block, both non-square directions; (40, 24, 4)
# and (24, 48, 3) have more than _ELEMENTWISE_MAX_BLOCKS blocks on each side (the matmul mixing); the last
# three pad the larger side to whole blocks (the output, the input, and the input on the matmul path).
SHAPES = [
    (16, 16, None),
    (16, 16, 4),
    (12, 12, 1),
    (8, 24, None),
    (24, 8, 4),
    (12, 18, 3),
    (18, 12, 6),
    (40, 24, 4),
    (24, 48, 3),
    (12, 20, None),
    (20, 12, None),
    (42, 24, 4),
]


# A lone diagonal (num_factors=1) exists only for square layers; its error is tested below.
FACTOR_CASES = [(*shape, m) for shape in SHAPES for m in (1, 3, 5) if m > 1 or shape[0] == shape[1]]


@pytest.mark.parametrize(("d_in", "d_out", "p", "num_factors"), FACTOR_CASES)
def test_delta_and_weight_match_dense_reference(d_in, d_out, p, num_factors):
    rng = np.random.default_rng(d_in * 100 + d_out + num_factors)
    diagonals, circulants = random_factors(rng, d_in, d_out, p, num_factors)
    x = rng.standard_normal((2, 3, d_in)).astype(np.float32)
    reference_w = dense_reference(diagonals, circulants)
    reference = x.astype(np.float64) @ reference_w
    scale = np.abs(reference).max()

    out = cdv.cdv_product_delta(jnp.asarray(x), diagonals, circulants)
    assert out.shape == (2, 3, d_out) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5 * scale)

    weight = cdv.cdv_product_weight(diagonals, circulants)
    assert weight.shape == (d_in, d_out) and weight.dtype == jnp.float32
    np.testing.assert_allclose(weight, reference_w, rtol=1e-6, atol=1e-6 * np.abs(reference_w).max())


@pytest.mark.parametrize(("d_in", "d_out", "p"), SHAPES)
def test_three_factor_api_is_the_paper_form(d_in, d_out, p):
    rng = np.random.default_rng(7)
    (a_in, a_out), (c,) = random_factors(rng, d_in, d_out, p, 3)
    x = rng.standard_normal((5, d_in)).astype(np.float32)
    # a_out * C(a_in * x), written with the explicit circulant.
    corner = dense_block_circulant(c.astype(np.float64))[:d_out, :d_in]  # all of it unless a side is padded
    reference = (a_out[:, None] * (corner @ (a_in[:, None] * x.T))).T
    np.testing.assert_allclose(
        cdv.cdv_delta(x, a_in, c, a_out), reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max()
    )
    weight = cdv.cdv_delta_weight(a_in, c, a_out)
    np.testing.assert_allclose(
        x @ np.asarray(weight), cdv.cdv_delta(x, a_in, c, a_out), rtol=1e-5, atol=1e-5 * np.abs(reference).max()
    )


@pytest.mark.parametrize(("d_in", "d_out", "p"), [(16, 16, None), (8, 24, 4), (24, 8, None), (40, 24, 4), (24, 48, 3)])
def test_bfloat16_inputs_compute_in_float32_and_return_bfloat16(d_in, d_out, p):
    rng = np.random.default_rng(3)
    (a_in, a_out), (c,) = random_factors(rng, d_in, d_out, p, 3)
    x = jnp.asarray(rng.standard_normal((4, d_in)), jnp.bfloat16)
    out = cdv.cdv_delta(x, a_in, c, a_out)
    assert out.dtype == jnp.bfloat16
    reference = np.asarray(x, np.float64) @ dense_reference([a_in, a_out], [c])
    # Float32 compute, then one rounding to bfloat16: half an ulp, at most 2**-8 relative (eps = 2**-7).
    np.testing.assert_allclose(np.asarray(out, np.float64), reference, rtol=2**-8, atol=1e-5 * np.abs(reference).max())


def _dense_jax_reference(x, diagonals, circulants):
    """Float64 dense reference in JAX (explicit index gather), differentiable."""
    h = x * diagonals[0]
    for d, c in zip(diagonals[1:], circulants, strict=True):
        q_out, q_in, p = c.shape
        index = np.array([[(r - s) % p for s in range(p)] for r in range(p)])
        blocks = c[:, :, index]  # (q_out, q_in, p, p): column-form blocks
        matrix = blocks.transpose(0, 2, 1, 3).reshape(q_out * p, q_in * p)
        h = (h @ matrix.T) * d
    return h


@pytest.mark.parametrize(
    ("d_in", "d_out", "p", "num_factors"),
    [(16, 16, None, 3), (8, 24, 4, 3), (12, 12, 3, 5), (40, 24, 4, 3), (24, 48, 3, 3), (30, 30, 5, 5), (12, 12, 1, 3)],
)
def test_gradients_match_dense_reference(d_in, d_out, p, num_factors):
    rng = np.random.default_rng(11)
    diagonals, circulants = random_factors(rng, d_in, d_out, p, num_factors)
    x = rng.standard_normal((3, d_in)).astype(np.float32)
    cotangent = rng.standard_normal((3, d_out)).astype(np.float32)

    def loss(fn, x, diagonals, circulants):
        return jnp.sum(fn(x, diagonals, circulants) * cotangent)

    # argnums 1, 2, 3: x (its gradient flows back to the layers below), the diagonals, the circulants.
    grads = jax.grad(loss, argnums=(1, 2, 3))(cdv.cdv_product_delta, x, diagonals, circulants)
    with jax.enable_x64(True):
        as64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        expected = jax.grad(loss, argnums=(1, 2, 3))(_dense_jax_reference, as64(x), as64(diagonals), as64(circulants))
        expected = jax.tree.map(np.asarray, expected)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_jit_and_vmap_over_parameter_sets():
    rng = np.random.default_rng(5)
    sets = [random_factors(rng, 8, 16, 4, 3) for _ in range(4)]
    a_in = jnp.stack([s[0][0] for s in sets])
    a_out = jnp.stack([s[0][1] for s in sets])
    c = jnp.stack([s[1][0] for s in sets])
    x = jnp.asarray(rng.standard_normal((4, 2, 8)), jnp.float32)
    batched = jax.jit(jax.vmap(cdv.cdv_delta))(x, a_in, c, a_out)
    for k in range(4):
        np.testing.assert_allclose(batched[k], cdv.cdv_delta(x[k], a_in[k], c[k], a_out[k]), rtol=1e-6, atol=1e-6)


def test_block_size_default_and_valid_sizes():
    assert cdv.cdv_shape(768, 768).block_size == 768
    assert cdv.cdv_shape(768, 3072).block_size == 768
    # The smaller side is one block; the larger is padded to whole blocks (18 -> 24).
    assert cdv.cdv_shape(12, 18).circulant_shapes == ((2, 1, 12),)
    assert cdv.cdv_shape(11008, 4096).circulant_shapes == ((1, 3, 4096),)
    assert cdv.cdv_shape(12, 18, 4).circulant_shapes == ((5, 3, 4),)
    assert cdv.padded_block_sizes(12, 18) == [1, 2, 3, 4, 6, 12]
    # Without padding (C3A, peft's rule): divisors of both sides, gcd by default.
    assert cdv.cdv_shape(12, 18, pad=False).circulant_shapes == ((3, 2, 6),)
    assert cdv.valid_block_sizes(12, 18) == [1, 2, 3, 6]


@pytest.mark.parametrize(
    ("d_in", "d_out", "p", "num_factors"),
    [(768, 768, None, 3), (768, 3072, 256, 3), (64, 64, 16, 5), (32, 32, 8, 1), (4096, 11008, None, 3)],
)
def test_parameter_count_is_the_number_of_stored_scalars(d_in, d_out, p, num_factors):
    shape = cdv.cdv_shape(d_in, d_out, p, num_factors)
    stored = sum(math.prod(s) for s in shape.diagonal_shapes + shape.circulant_shapes)
    m, p = (num_factors + 1) // 2, shape.block_size

    # m diagonals, one d_in -> d_out circulant and m - 2 square ones, each with (padded d_in) * (padded d_out) / p
    # entries, a side padded up to whole blocks.
    def padded(d):
        return -(-d // p) * p

    by_formula = d_in + (m - 1) * d_out
    if m > 1:
        by_formula += padded(d_in) * padded(d_out) // p + (m - 2) * padded(d_out) ** 2 // p
    assert cdv.cdv_num_params(shape) == stored == by_formula


def test_square_one_block_layer_has_three_d_parameters():
    assert cdv.cdv_num_params(cdv.cdv_shape(768, 768)) == 3 * 768


def test_flops_per_token_follows_the_documented_convention():
    # p = 8, one block: 2 diagonals of 8, rfft + irfft at 2.5 * 8 * log2(8) = 60 each,
    # and 5 frequencies x one complex multiply-add (8 flops).
    assert cdv.cdv_flops_per_token(cdv.cdv_shape(8, 8)) == 16 + 60 + 5 * 8 + 60
    # Two input blocks, one output block of p = 4: diagonals 8 + 4, two rffts and one irfft
    # of 2.5 * 4 * 2 = 20 each, 2 x 3 frequencies x 8.
    assert cdv.cdv_flops_per_token(cdv.cdv_shape(8, 4, 4)) == 12 + 2 * 20 + 2 * 3 * 8 + 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(d_in=12, d_out=18, block_size=5),
            r"'blk'.*d_in=12, d_out=18.*block_size=5 does not divide the smaller.*\[1, 2, 3, 4, 6, 12\]",
        ),
        (
            dict(d_in=12, d_out=18, block_size=4, pad=False),
            r"'blk'.*block_size=4 does not divide both dimensions.*\[1, 2, 3, 6\]",
        ),
        (dict(d_in=12, d_out=12, block_size=0), r"'blk'.*block_size=0"),
        (dict(d_in=12, d_out=18, num_factors=1), r"'blk'.*num_factors=1.*square"),
        (dict(d_in=12, d_out=12, num_factors=4), r"'blk'.*odd"),
        (dict(d_in=12, d_out=12, num_factors=-1), r"'blk'.*odd"),
        (dict(d_in=0, d_out=12), r"'blk'.*positive"),
    ],
)
def test_bad_shapes_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cdv.cdv_shape(layer="blk", **kwargs)


def test_mismatched_factors_raise_clear_errors():
    a, c = jnp.ones(8), jnp.ones((1, 1, 8))
    with pytest.raises(ValueError, match="x has 4 features; the CDV factors expect d_in=8"):
        cdv.cdv_delta(jnp.ones((2, 4)), a, c, a)
    with pytest.raises(ValueError, match="maps 8 -> 8 features, but sits between diagonals of lengths 8 and 16"):
        cdv.cdv_delta(jnp.ones((2, 8)), a, c, jnp.ones(16))
    with pytest.raises(ValueError, match="expected 2 diagonals for 1 circulants"):
        cdv.cdv_product_delta(jnp.ones((2, 8)), [a], [c])


def test_circulant_apply_is_circular_convolution():
    # y[k] = sum_m c[m] u[(k - m) mod p], checked entry by entry.
    rng = np.random.default_rng(0)
    c = rng.standard_normal((1, 1, 6))
    u = rng.standard_normal(6)
    expected = [sum(c[0, 0, m] * u[(k - m) % 6] for m in range(6)) for k in range(6)]
    np.testing.assert_allclose(cdv.block_circulant_apply(jnp.asarray(c), jnp.asarray(u)), expected, rtol=1e-5)
    np.testing.assert_allclose(cdv.block_circulant_matrix(jnp.asarray(c)), scipy.linalg.circulant(c[0, 0]), rtol=1e-6)


# (q_out, q_in, p): one block, few blocks on one side (elementwise mixing), many on both (matmul
# mixing) with non-square, odd and tiny p, and either side of the _ELEMENTWISE_MAX_BLOCKS switch.
APPLY_SHAPES = [(1, 1, 8), (4, 1, 6), (1, 12, 2), (3, 7, 5), (4, 4, 4), (5, 5, 4), (6, 10, 4), (16, 8, 3), (9, 6, 1)]


def test_apply_shapes_cover_both_mixing_paths():
    smaller = [min(q_out, q_in) for q_out, q_in, _ in APPLY_SHAPES]
    assert min(smaller) <= cdv.cdv._ELEMENTWISE_MAX_BLOCKS < max(smaller)


@pytest.mark.parametrize(("q_out", "q_in", "p"), APPLY_SHAPES)
@pytest.mark.parametrize("lead", [(), (7,), (2, 3)])
def test_block_circulant_apply_and_gradients_match_numpy(q_out, q_in, p, lead):
    rng = np.random.default_rng(q_out * 100 + q_in * 10 + p)
    c = rng.standard_normal((q_out, q_in, p)).astype(np.float32)
    u = rng.standard_normal((*lead, q_in * p)).astype(np.float32)
    g = rng.standard_normal((*lead, q_out * p)).astype(np.float32)
    matrix = dense_block_circulant(c.astype(np.float64))  # (q_out p, q_in p), column form
    u64, g64 = u.astype(np.float64).reshape(-1, q_in * p), g.astype(np.float64).reshape(-1, q_out * p)
    expected = (u64 @ matrix.T).reshape(*lead, q_out * p)

    out = cdv.block_circulant_apply(jnp.asarray(c), jnp.asarray(u))
    assert out.shape == (*lead, q_out * p) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())

    # Analytic gradients of sum(g * (u @ M^T)): d/du = g @ M, and d/dc[i, j, k] sums the
    # entries of block (i, j) of dM = g^T u that c[i, j, k] fills, M[r, s] = c[(r - s) mod p].
    want_u = (g64 @ matrix).reshape(u.shape)
    d_matrix = (g64.T @ u64).reshape(q_out, p, q_in, p).transpose(0, 2, 1, 3)
    r = np.arange(p)
    want_c = np.stack([d_matrix[:, :, r, (r - k) % p].sum(-1) for k in range(p)], axis=-1)
    loss = lambda c, u: jnp.sum(jnp.asarray(g) * cdv.block_circulant_apply(c, u))  # noqa: E731
    got_c, got_u = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(c), jnp.asarray(u))
    np.testing.assert_allclose(got_u, want_u, rtol=1e-5, atol=1e-5 * np.abs(want_u).max())
    np.testing.assert_allclose(got_c, want_c, rtol=1e-5, atol=1e-5 * np.abs(want_c).max())


@pytest.mark.parametrize(("q_out", "q_in", "p"), [(4, 1, 6), (6, 10, 4), (16, 8, 3)])
def test_block_circulant_apply_computes_bfloat16_inputs_in_float32(q_out, q_in, p):
    rng = np.random.default_rng(2)
    c = jnp.asarray(rng.standard_normal((q_out, q_in, p)), jnp.bfloat16)
    u = jnp.asarray(rng.standard_normal((2, 3, q_in * p)), jnp.bfloat16)
    out = cdv.block_circulant_apply(c, u)
    assert out.dtype == jnp.float32
    # The bfloat16 values are exact in float64, so only float32 rounding separates the two.
    expected = np.asarray(u, np.float64) @ dense_block_circulant(np.asarray(c, np.float64)).T
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
