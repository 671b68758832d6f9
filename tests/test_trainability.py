"""CDVFT trains with the library's defaults: a fast synthetic regression whose target ``dW`` is a CDV product.

A regression in the init, the optimizer wiring or the default learning rate shows here in seconds, before
any accuracy benchmark: a frozen layer plus a CDV delta must fit a target that CDVFT represents exactly,
from the default zero init, with ``adapter_optimizer``'s default rate.
"""

import pytest

import cdvft_jax
from benchmarks.cdv_gradient_scales import fit

STEPS = 200
# Relative squared error (to the target delta's) the defaults must reach within STEPS.  Measured on the
# 2-core CPU box, 2026-12-01 (deterministic keys): default rate 3.7e-3 (64 x 64) and 5.3e-3 (64 x 32);
# a 4x lower rate 0.25 and 0.38.
REACHED = 1e-2


@pytest.mark.parametrize(("d_in", "d_out"), [(64, 64), (64, 32)])
def test_defaults_fit_a_cdv_target(d_in, d_out):
    # Every default: CDVFTConfig's init and block size, the method's rate, no decay, no clipping.
    (error,) = fit(d_in, d_out, lambda adapted: cdvft_jax.adapter_optimizer(adapted), STEPS, report_at=[STEPS])
    assert error < REACHED, f"relative error {error:.3g} after {STEPS} steps"


def test_a_4x_lower_rate_does_not():
    """The bar is tight enough to catch a default rate 4x too low."""
    rate = cdvft_jax.CDVFT.learning_rate / 4
    (error,) = fit(
        64, 64, lambda adapted: cdvft_jax.adapter_optimizer(adapted, adapter_learning_rate=rate), STEPS, [STEPS]
    )
    assert error > REACHED, f"relative error {error:.3g} at a 4x lower rate"
