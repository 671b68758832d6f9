"""The circulant-and-diagonal-vector (CDV) operator: pure functions, no Flax.

A CDV delta with ``num_factors = 2m - 1`` alternates ``m`` diagonal factors and
``m - 1`` block-circulant factors (column-vector form, the paper's notation)::

    dW = D_{m-1} C_{m-1} ... D_1 C_1 D_0

``D_0 = diag(a_in)`` acts on the layer input (length ``d_in``); every later
diagonal has length ``d_out``; ``C_1`` maps ``d_in -> d_out`` and the later
circulants ``d_out -> d_out``.  A block-circulant ``C`` with block size ``p`` is
stored as ``c`` of shape ``(ceil(rows / p), ceil(cols / p), p)``: block ``(i, j)`` is the
``p x p`` circulant matrix whose first column is ``c[i, j]``, so it applies to a
piece ``u`` of the input as ``irfft(rfft(c[i, j]) * rfft(u), n=p)`` and output
block ``i`` sums over ``j``.  When ``p`` does not divide a side (a Llama MLP's
``4096 <-> 11008`` with ``p = 4096``), that side is zero-padded to a whole number of
blocks and ``C`` is the top-left ``rows x cols`` corner of the padded block-circulant.

On activations (row vectors, Flax's ``x @ kernel`` convention) the delta is
``a_out * C(... a_in * x)``.  It is computed with 1-D real FFTs in float32
whatever the input dtype (XLA has no low-precision FFT) and is never
materialised; :func:`cdv_delta_weight` builds the dense ``(d_in, d_out)``
matrix for merging into a kernel.  The sum over input blocks happens in the
frequency domain, so each output block needs one inverse FFT: as an
elementwise product-and-sum when either side has few blocks, otherwise as one
real float32 matmul per frequency (:func:`block_circulant_apply` says why).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "CDVShape",
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
    "padded_block_sizes",
    "valid_block_sizes",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def padded_block_sizes(d_in: int, d_out: int) -> list[int]:
    """Block sizes ``p`` that divide the smaller dimension, ascending: the valid ones when the larger side
    may be zero-padded to whole blocks (CDVFT's rule).

    >>> padded_block_sizes(12, 18)
    [1, 2, 3, 4, 6, 12]
    """
    small = min(d_in, d_out)
    return [p for p in range(1, small + 1) if small % p == 0]


def valid_block_sizes(d_in: int, d_out: int) -> list[int]:
    """Block sizes ``p`` that divide both ``d_in`` and ``d_out``, ascending.

    >>> valid_block_sizes(768, 3072)
    [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 768]
    """
    g = math.gcd(d_in, d_out)
    return [p for p in range(1, g + 1) if g % p == 0]


class CDVShape(NamedTuple):
    """The resolved shapes of one layer's CDV factors.

    Attributes:
      d_in: input features of the layer.
      d_out: output features of the layer.
      block_size: circulant block size ``p``.
      num_factors: ``2m - 1`` factors in the product.
      diagonal_shapes: shape of each of the ``m`` diagonal vectors, input first.
      circulant_shapes: shape of each of the ``m - 1`` block-circulant tensors.
    """

    d_in: int
    d_out: int
    block_size: int
    num_factors: int
    diagonal_shapes: tuple[tuple[int], ...]
    circulant_shapes: tuple[tuple[int, int, int], ...]


def cdv_shape(
    d_in: int,
    d_out: int,
    block_size: int | None = None,
    num_factors: int = 3,
    layer: str = "<layer>",
    *,
    pad: bool = True,
) -> CDVShape:
    """Validates a CDV configuration for a ``(d_in, d_out)`` layer and resolves it.

    Args:
      d_in: input features.
      d_out: output features.
      block_size: circulant block size.  With ``pad``, any divisor of the
        smaller dimension (the larger side is zero-padded to whole blocks when
        ``p`` does not divide it), and ``None`` is the smaller dimension: one
        block for a square layer, one block row or column otherwise.  Without
        ``pad``, a divisor of both, and ``None`` is ``gcd(d_in, d_out)``.
      num_factors: an odd number ``>= 1`` of alternating factors.
      layer: the layer's name, quoted in error messages.
      pad: whether the larger side may be zero-padded (CDVFT); C3A (peft's
        rule) tiles both sides exactly.

    Returns:
      The :class:`CDVShape` with every factor's shape.

    Raises:
      ValueError: on a non-positive dimension, an even or non-positive
        ``num_factors``, a lone diagonal (``num_factors=1``) on a non-square
        layer, or a block size that is not valid (the message lists the valid
        block sizes).

    >>> cdv_shape(768, 768).circulant_shapes
    ((1, 1, 768),)
    >>> cdv_shape(4096, 11008).circulant_shapes  # 11008 outputs: 3 blocks of 4096, the last cut short
    ((3, 1, 4096),)
    """
    if d_in <= 0 or d_out <= 0:
        raise ValueError(f"layer {layer!r}: dimensions must be positive, got ({d_in}, {d_out})")
    if isinstance(num_factors, bool) or not isinstance(num_factors, int):
        raise ValueError(f"layer {layer!r}: num_factors must be an int, got {num_factors!r}")
    if num_factors < 1 or num_factors % 2 == 0:
        raise ValueError(
            f"layer {layer!r}: num_factors must be odd and >= 1 (diag, circ, diag, ..., diag), got {num_factors}"
        )
    if num_factors == 1 and d_in != d_out:
        raise ValueError(
            f"layer {layer!r} of shape (d_in={d_in}, d_out={d_out}): num_factors=1 "
            "(a lone diagonal) is only valid for square layers"
        )
    if block_size is None:
        block_size = min(d_in, d_out) if pad else math.gcd(d_in, d_out)
    elif isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ValueError(f"layer {layer!r}: block_size must be an int or None, got {block_size!r}")
    valid = padded_block_sizes(d_in, d_out) if pad else valid_block_sizes(d_in, d_out)
    if block_size not in valid:
        rule = "the smaller dimension" if pad else "both dimensions"
        raise ValueError(
            f"layer {layer!r} of shape (d_in={d_in}, d_out={d_out}): block_size={block_size} "
            f"does not divide {rule}; valid block sizes: {valid}"
        )
    m = (num_factors + 1) // 2
    p = block_size
    diagonals = ((d_in,),) + ((d_out,),) * (m - 1)
    circulants = tuple((-(-d_out // p), -(-(d_in if k == 0 else d_out) // p), p) for k in range(m - 1))
    return CDVShape(d_in, d_out, p, num_factors, diagonals, circulants)


def cdv_num_params(shape: CDVShape) -> int:
    """Trainable parameters of one CDV layer: every diagonal and circulant entry.

    >>> cdv_num_params(cdv_shape(768, 768))  # 3 * 768
    2304
    """
    return sum(math.prod(s) for s in shape.diagonal_shapes + shape.circulant_shapes)


def _rfft_flops(n: int) -> float:
    # Convention: a complex FFT of length n costs 5 n log2 n flops; a real FFT
    # (forward or inverse) half of that.
    return 2.5 * n * math.log2(n) if n > 1 else 0.0


def cdv_flops_per_token(shape: CDVShape) -> float:
    """Analytic floating-point operations per token for the forward delta.

    Counting convention: each real FFT or inverse real FFT of length ``p``
    costs ``2.5 p log2 p``; a complex multiply-add in the frequency domain
    costs 8 (one complex multiply = 6, accumulate = 2), one per output block,
    input block and frequency; each diagonal scaling costs one multiply per
    element.  The 8 is exact for both ways :func:`block_circulant_apply` mixes
    the blocks: the elementwise complex product-and-sum, and the real matmul
    ``[re, im] @ [[c_re, c_im], [-c_im, c_re]]`` whose 4 real multiply-adds
    per complex pair are the same 8 flops.  The spectra ``rfft(c)`` of the
    circulant weights are computed once per step, not per token, and are not
    counted.
    """
    p = shape.block_size
    freqs = p // 2 + 1
    flops = float(sum(s[0] for s in shape.diagonal_shapes))
    for q_out, q_in, _ in shape.circulant_shapes:
        flops += q_in * _rfft_flops(p) + q_out * q_in * freqs * 8 + q_out * _rfft_flops(p)
    return flops


def cdv_flops_per_step(shape: CDVShape) -> float:
    """Analytic flops of the per-step work: one real FFT of every circulant block's first column.

    Same convention as :func:`cdv_flops_per_token`; this is the part that
    does not grow with the number of tokens.
    """
    p = shape.block_size
    return float(sum(q_out * q_in * _rfft_flops(p) for q_out, q_in, _ in shape.circulant_shapes))


# Up to this many blocks on the smaller side, block_circulant_apply mixes blocks elementwise.
_ELEMENTWISE_MAX_BLOCKS = 4


def block_circulant_apply(c: jax.Array, u: jax.Array) -> jax.Array:
    """Applies the block-circulant ``C`` given by ``c`` to row vectors ``u``.

    Output block ``i`` is ``irfft(sum_j rfft(c[i, j]) * rfft(u_j))``: summing
    over input blocks in the frequency domain costs one inverse FFT per output
    block instead of one per block pair.  The sum is done in one of two ways,
    chosen by measured fwd+bwd time on CPU:

    * at most :data:`_ELEMENTWISE_MAX_BLOCKS` blocks on the smaller side (one
      block, the default block size of a 768 x 3072 layer, ...): an
      elementwise complex product-and-sum, which XLA fuses into one pass over
      the spectra in the layout the FFTs use;
    * otherwise a batched real matmul with the frequency as the batch
      dimension, ``[u_re, u_im] @ [[c_re, c_im], [-c_im, c_re]]`` per
      frequency.  The elementwise form re-reads the spectra once per block
      pair, so it falls behind from 8 x 8 blocks on, and XLA runs the
      equivalent complex einsum poorly; the stacked real form is one float32
      GEMM of width ``2 q_in -> 2 q_out`` per frequency, paid for by a
      transpose to and from frequency-major order.  (Real DFTs as matmuls
      avoid the transposes, but were not consistently faster even at small
      ``p``, so there is no third path.)

    Args:
      c: ``(q_out, q_in, p)`` first columns of the circulant blocks.
      u: ``(..., q_in * p)`` inputs; computed in float32.

    Returns:
      ``(..., q_out * p)`` float32 outputs, ``(C u^T)^T`` for each row.
    """
    q_out, q_in, p = c.shape
    if u.shape[-1] != q_in * p:
        raise ValueError(f"input has {u.shape[-1]} features; the circulant expects {q_in * p}")
    lead = u.shape[:-1]
    u_spec = jnp.fft.rfft(u.astype(jnp.float32).reshape(math.prod(lead), q_in, p), axis=-1)
    c_spec = jnp.fft.rfft(c.astype(jnp.float32), axis=-1)
    if min(q_in, q_out) <= _ELEMENTWISE_MAX_BLOCKS:
        y_spec = jnp.sum(u_spec[:, None] * c_spec, axis=2)
    else:
        y_spec = _mix_frequency_major(u_spec, c_spec)
    y = jnp.fft.irfft(y_spec, n=p, axis=-1)
    return y.reshape(*lead, q_out * p)


def _mix_frequency_major(u_spec: jax.Array, c_spec: jax.Array) -> jax.Array:
    """``y[n, i, f] = sum_j u[n, j, f] c[i, j, f]`` as one real matmul per frequency ``f``.

    ``u_spec`` is ``(n, q_in, F)`` and ``c_spec`` ``(q_out, q_in, F)``, both
    complex; the result is ``(n, q_out, F)``.  Row vectors ``[u_re, u_im]``
    times ``[[c_re, c_im], [-c_im, c_re]]`` give ``[y_re, y_im]``; stacking
    doubles the matmul width instead of issuing four narrow real matmuls,
    which measured slower.  ``HIGHEST`` keeps GPUs and TPUs from rounding the
    float32 operands to TF32 / bfloat16.
    """
    q_out = c_spec.shape[0]
    u_f = u_spec.transpose(2, 0, 1)  # (F, n, q_in): the batch dimension first, as XLA's dot wants
    u_stacked = jnp.concatenate([u_f.real, u_f.imag], axis=-1)
    c_f = c_spec.transpose(2, 1, 0)  # (F, q_in, q_out)
    c_stacked = jnp.block([[c_f.real, c_f.imag], [-c_f.imag, c_f.real]])  # (F, 2 q_in, 2 q_out)
    y = jax.lax.dot_general(u_stacked, c_stacked, (((2,), (1,)), ((0,), (0,))), precision=_HIGHEST)
    return jax.lax.complex(y[..., :q_out], y[..., q_out:]).transpose(1, 2, 0)


def block_circulant_matrix(c: jax.Array) -> jax.Array:
    """The dense ``(q_out * p, q_in * p)`` float32 matrix of a block-circulant.

    Built by gathering, so it is exact (no FFT rounding).
    """
    q_out, q_in, p = c.shape
    k = jnp.arange(p)
    index = (k[:, None] - k[None, :]) % p  # C[r, s] = c[(r - s) mod p]
    blocks = c.astype(jnp.float32)[:, :, index]  # (q_out, q_in, p, p)
    return blocks.transpose(0, 2, 1, 3).reshape(q_out * p, q_in * p)


def _check_factors(diagonals: Sequence[jax.Array], circulants: Sequence[jax.Array]) -> None:
    if len(diagonals) != len(circulants) + 1:
        raise ValueError(
            f"a CDV product alternates diagonals and circulants: expected "
            f"{len(circulants) + 1} diagonals for {len(circulants)} circulants, got {len(diagonals)}"
        )
    if any(d.ndim != 1 for d in diagonals):
        raise ValueError(f"diagonal factors must be vectors, got shapes {[d.shape for d in diagonals]}")
    if any(c.ndim != 3 for c in circulants):
        raise ValueError(f"circulant factors must have shape (q_out, q_in, p), got {[c.shape for c in circulants]}")
    width = diagonals[0].shape[0]
    for diag, circ in zip(diagonals[1:], circulants, strict=True):
        q_out, q_in, p = circ.shape
        if q_in != -(-width // p) or q_out != -(-diag.shape[0] // p):
            raise ValueError(
                f"circulant of shape {circ.shape} maps {q_in * p} -> {q_out * p} features, "
                f"but sits between diagonals of lengths {width} and {diag.shape[0]}"
            )
        width = diag.shape[0]


def _padded_apply(circ: jax.Array, h: jax.Array, d_out: int) -> jax.Array:
    """The ``(..., d_out)`` corner of the block-circulant ``circ`` applied to ``h``, zero-padded to whole blocks."""
    q_out, q_in, p = circ.shape
    missing = q_in * p - h.shape[-1]
    if missing:
        h = jnp.pad(h, [(0, 0)] * (h.ndim - 1) + [(0, missing)])
    y = block_circulant_apply(circ, h)
    return y[..., :d_out] if q_out * p != d_out else y


def cdv_product_delta(
    x: jax.Array,
    diagonals: Sequence[jax.Array],
    circulants: Sequence[jax.Array],
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:
    """The delta ``x @ dW`` of a general ``2m - 1`` factor CDV product.

    Args:
      x: ``(..., d_in)`` activations, any float dtype.
      diagonals: ``m`` vectors, ``diagonals[0]`` of length ``d_in`` and the
        others of length ``d_out``.
      circulants: ``m - 1`` block-circulant tensors ``(q_out, q_in, p)``; the
        first maps ``d_in -> d_out``, the others ``d_out -> d_out``.  Any
        ``p`` works here, each side taking ``ceil(width / p)`` blocks (zero
        padding, then the corner); :func:`cdv_shape` is where a config's block
        size is held to the rules.
      out_dtype: dtype of the result; ``None`` means ``x.dtype``.

    Returns:
      ``(..., d_out)``, computed in float32 and cast to ``out_dtype``.
    """
    _check_factors(diagonals, circulants)
    if x.shape[-1] != diagonals[0].shape[0]:
        raise ValueError(f"x has {x.shape[-1]} features; the CDV factors expect d_in={diagonals[0].shape[0]}")
    h = x.astype(jnp.float32) * diagonals[0].astype(jnp.float32)
    for diag, circ in zip(diagonals[1:], circulants, strict=True):
        h = _padded_apply(circ, h, diag.shape[0]) * diag.astype(jnp.float32)
    return h.astype(x.dtype if out_dtype is None else out_dtype)


def cdv_product_weight(diagonals: Sequence[jax.Array], circulants: Sequence[jax.Array]) -> jax.Array:
    """The dense ``(d_in, d_out)`` float32 matrix (Flax kernel layout) of a CDV product.

    ``x @ cdv_product_weight(ds, cs)`` equals ``cdv_product_delta(x, ds, cs)``.
    """
    _check_factors(diagonals, circulants)
    # Row-vector form: x @ W with W = D_0 C_1^T D_1 C_2^T ... D_{m-1}.  Diagonals scale rows and
    # columns; only products of circulants need a matmul (none for the paper's three factors).
    if not circulants:
        return jnp.diag(diagonals[0].astype(jnp.float32))

    def corner(circ: jax.Array, rows: int, cols: int) -> jax.Array:  # C^T without the padded rows and columns
        return block_circulant_matrix(circ)[:rows, :cols].T

    d_in, d_out = diagonals[0].shape[0], diagonals[1].shape[0]
    weight = diagonals[0].astype(jnp.float32)[:, None] * corner(circulants[0], d_out, d_in)
    weight = weight * diagonals[1].astype(jnp.float32)
    for diag, circ in zip(diagonals[2:], circulants[1:], strict=True):
        weight = jnp.matmul(weight, corner(circ, d_out, d_out), precision=_HIGHEST)
        weight = weight * diag.astype(jnp.float32)
    return weight


def cdv_delta(x: jax.Array, a_in: jax.Array, c: jax.Array, a_out: jax.Array) -> jax.Array:
    """The three-factor CDV delta ``x @ dW`` with ``dW = D_out C D_in`` (paper's form).

    Args:
      x: ``(..., d_in)`` activations of any float dtype and any leading dims.
      a_in: ``(d_in,)`` input diagonal.
      c: ``(ceil(d_out / p), ceil(d_in / p), p)`` block-circulant first columns.
      a_out: ``(d_out,)`` output diagonal.

    Returns:
      ``a_out * C(a_in * x)`` of shape ``(..., d_out)``, computed with float32
      real FFTs and cast back to ``x.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((2, 4))
      >>> c = jnp.zeros((1, 1, 4)).at[0, 0, 0].set(1.0)  # identity circulant
      >>> cdv_delta(x, jnp.full(4, 2.0), c, jnp.full(4, 3.0))[0]
      Array([6., 6., 6., 6.], dtype=float32)
    """
    return cdv_product_delta(x, (a_in, a_out), (c,))


def cdv_delta_weight(a_in: jax.Array, c: jax.Array, a_out: jax.Array) -> jax.Array:
    """The ``(d_in, d_out)`` float32 matrix of :func:`cdv_delta` in Flax kernel layout.

    ``x @ cdv_delta_weight(a_in, c, a_out) == cdv_delta(x, a_in, c, a_out)``
    up to float32 rounding.
    """
    return cdv_product_weight((a_in, a_out), (c,))
