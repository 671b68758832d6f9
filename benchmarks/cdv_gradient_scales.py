"""Does Adam absorb the different gradient scales of ``a_in``, ``c`` and ``a_out``?  (issue 10, NOTES.md)

A frozen Dense layer plus a CDV adapter (default config: one block per square layer, zero init) is fitted
to a target ``dW`` that is itself a random CDV product.  The study runs Adam at rate ``lr`` for the diagonals
and ``lr * scale`` for the circulant, ``scale`` in 1, ``1/sqrt(p)`` and ``1/p`` (the block-circulant adapter
paper, BCA, divides the rate by ``p``), and prints the squared error relative to the target delta's::

    python -m benchmarks.cdv_gradient_scales            # d 64 and 384, three rates, three scales: ~1 min

``tests/test_trainability.py`` runs :func:`fit` with the library's default optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import cdvft_jax
from train.cli import Floats, Ints, check_distinct, parse


class OneDense(nn.Module):
    """A single Dense layer named ``proj``."""

    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, name="proj")(x)


def random_cdv_target(key: jax.Array, d_in: int, d_out: int) -> jax.Array:
    """A random block-circulant CDV product ``D_out C D_in`` (dense, Flax layout) of unit-order entries."""
    (c_shape,) = cdvft_jax.cdv_shape(d_in, d_out).circulant_shapes
    k_in, k_c, k_out = jax.random.split(key, 3)
    a_in = 1.0 + 0.5 * jax.random.normal(k_in, (d_in,))
    c = jax.random.normal(k_c, c_shape) / c_shape[-1] ** 0.5
    a_out = 0.5 * jax.random.normal(k_out, (d_out,))
    return cdvft_jax.cdv_delta_weight(a_in, c, a_out)


def fit(
    d_in: int,
    d_out: int,
    make_optimizer: Callable[[cdvft_jax.AdaptedModel], optax.GradientTransformation],
    steps: int,
    report_at: Sequence[int],
    tokens: int = 256,
) -> list[float]:
    """Trains the CDV adapter of a frozen ``(d_in, d_out)`` layer towards a random CDV target.

    Returns the squared error relative to the target delta's (the zero init's error) at each step of
    ``report_at``, measured on that step's batch after its update; every step sees fresh Gaussian inputs.
    """
    model = OneDense(d_out)
    x0 = jnp.ones((1, d_in))
    base = model.init(jax.random.key(0), x0)["params"]
    target = random_cdv_target(jax.random.key(1), d_in, d_out)
    adapted = cdvft_jax.inject(model, cdvft_jax.CDVFTConfig(target_modules=["proj"]), x0)
    trainable, frozen = adapted.split(adapted.init(jax.random.key(2), base))
    optimizer = make_optimizer(adapted)
    state = cdvft_jax.init_train_state(trainable, optimizer)

    def loss_fn(params, x, rng):
        del rng
        wanted = x @ base["proj"]["kernel"] + base["proj"]["bias"] + x @ target
        return jnp.mean((adapted(x, params=params) - wanted) ** 2)

    step = cdvft_jax.make_train_step(loss_fn, optimizer)
    xs = jax.random.normal(jax.random.key(3), (steps, tokens, d_in))
    errors = []
    for i, x in enumerate(xs):
        state, _ = step(state, frozen, x, jax.random.key(0))
        if i + 1 in report_at:
            error = loss_fn(cdvft_jax.merge_params(state.trainable, frozen), x, None)
            errors.append(float(error) / float(jnp.mean((x @ target) ** 2)))
    return errors


def per_factor_adam(
    lr: float, circulant_scale: float
) -> Callable[[cdvft_jax.AdaptedModel], optax.GradientTransformation]:
    """Adam at ``lr`` on the diagonals and ``lr * circulant_scale`` on ``cdv_c``."""

    def make(adapted: cdvft_jax.AdaptedModel) -> optax.GradientTransformation:
        del adapted
        return optax.multi_transform(
            {"circulant": optax.adam(lr * circulant_scale), "diagonal": optax.adam(lr)},
            lambda tree: jax.tree_util.tree_map_with_path(
                lambda path, _: "circulant" if path[-1].key == "cdv_c" else "diagonal", tree
            ),
        )

    return make


@dataclasses.dataclass(frozen=True)
class GradientScalesConfig:
    """Per-factor Adam rates on a synthetic CDV target.

    Attributes:
      dims: the layer widths d (= p) fitted.
      rates: the Adam learning rates of the diagonals.
    """

    dims: Ints = (64, 384)
    rates: Floats = (5e-3, 2e-2, 5e-2)

    def __post_init__(self) -> None:
        check_distinct(self.dims, "dims", low=1)
        check_distinct(self.rates, "rates", low=0, strict=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m benchmarks.cdv_gradient_scales``: the table on stdout."""
    args = parse(
        GradientScalesConfig,
        argv,
        prog="python -m benchmarks.cdv_gradient_scales",
        description=GradientScalesConfig.__doc__.split("\n")[0],
    )
    print("| d = p | lr | circulant rate scale | relative error after 100 steps | after 300 |")
    print("|---:|---:|---|---:|---:|")
    for d in args.dims:
        for lr in args.rates:
            for label, scale in (("1", 1.0), ("1/sqrt(p)", d**-0.5), ("1/p", 1.0 / d)):
                early, late = fit(d, d, per_factor_adam(lr, scale), steps=300, report_at=(100, 300))
                print(f"| {d} | {lr:g} | {label} | {early:.2g} | {late:.2g} |", flush=True)


if __name__ == "__main__":
    main()
