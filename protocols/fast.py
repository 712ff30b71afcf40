"""``puma-fast``: cheaper and more accurate variants of PUMA's functions (ours).

Measured SPU ABY3 costs set the design (bytes per element, all parties): a secret
multiplication 52, a multiplication by a public fixed-point constant 28 (the truncation), a
comparison 108, a select on a secret bit 64; additions and integer multiples are free.

- GeLU and SiLU are x/2 plus an *even* analytic function:
  gelu(x) = x/2 + (x/2) erf(x/sqrt 2), silu(x) = x/2 + (x/2) tanh(x/2).
  Inside |x| < T the even part is a polynomial in u = x^2 / T^2 (evaluated by Horner's rule,
  which needs no separate constant multiplications); outside it the function is relu(x) to
  within the stated error. Two comparisons (x > 0 and u < 1, evaluated in one batched call) and
  two selects, against PUMA's three and three.
- Softmax clips exponents below -14 to 0 like PUMA, and on the remaining [-14, 0] takes exp as
  p(z / 8)^8 with a fitted cubic p: 3 squarings instead of PUMA's 8 for 20x less error.
  Masked entries are zeroed by the public mask at no cost.
- LayerNorm/RMSNorm refine SPU's rsqrt with one Newton step per row (a handful of
  multiplications per row, not per element) and take the sum of squares from the diagonal of
  the rows' Gram matrix (a secret product costs per output, not per term).
- The embedding is a one-hot product with the one-hot rows made by the client, which knows its
  own ids, and secret-shared like any input (``client_onehot``): the parties skip V equality
  tests per token and their boolean-to-arithmetic conversion. The one-hot upload (V shares per
  token) is reported as input traffic, not party traffic.

Coefficients were fitted by iteratively reweighted least squares (near-minimax) on dense grids
in float64; the errors quoted are measured on [-12, 12] and asserted in tests.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from puma.protocols import puma as puma_set
from puma.protocols.base import MASK_FILL, ExecutionPlan, input_limit, square_limit

#: |x| below which the polynomial is used for GeLU.
GELU_T = 2.8
#: gelu(x) - x/2 ~ sum_k GELU_Q[k] * s^k with s = x^2, on |x| < GELU_T (constant first).
GELU_Q = (6.5622309673221326e-03, 3.6638120793403106e-01, -4.0213480940609260e-02, 2.0588872730418809e-03)

#: |x| below which the polynomial is used for SiLU.
SILU_T = 7.0
#: silu(x) - x/2 ~ sum_k SILU_Q[k] * s^k with s = x^2, on |x| < SILU_T (constant first).
SILU_Q = (
    4.5038240647630942e-03,
    2.3689803077411165e-01,
    -1.4314265525816442e-02,
    6.7428197264319937e-04,
    -1.8731104775559052e-05,
    2.7230368232757923e-07,
    -1.5909927682741346e-09,
)

#: Scores more than this below the row max get probability 0 (exp(-14) < 2^-18, as PUMA).
EXP_CLIP = 14.0
#: Squarings in the softmax exponential: exp(z) = p(z / 2^n)^(2^n).
EXP_ITERS = 3
#: p(y) ~ exp(y), cubic (constant first), fitted so that p(z / 8)^8 is near-minimax on [-14, 0].
EXP_P = (0.9999931323164719, 0.9992893756390469, 0.4902501269148176, 0.12972278352135724)


def _even_piecewise(x, bound: float, coeffs, scale: float):
    """x/2 + q(x^2) for |x| < bound, relu(x) beyond; q by Horner's rule in v = x^2 / scale.

    ``scale`` trades one truncation per element (scale != 1) against the fixed-point precision
    of the coefficients of v^k (scale = bound^2 keeps them all O(1)).
    """
    v = x * x if scale == 1.0 else (x * x) * (1.0 / scale)
    scaled = [c * scale**k for k, c in enumerate(coeffs)]  # q(s) = sum_k scaled[k] v^k
    even = scaled[-1] * v + scaled[-2]
    for c in reversed(scaled[:-2]):
        even = even * v + c
    limit = bound**2 / scale
    positive, inside = jnp.split(jnp.concatenate([x, limit - v]) > 0, 2)  # both comparisons in one call
    return jnp.where(inside, 0.5 * x + even, jnp.where(positive, x, 0.0))


@input_limit(square_limit)
def gelu(x):
    """GeLU as x/2 + q(x^2) inside |x| < 2.8, relu(x) outside (``GELU_Q``, degree 3 in x^2).

    Domain: |x| below the square root of the product limit (8192 at FM64/18): the comparison
    that picks the piece reads x^2 (measured under SPU: wrong at |x| = 1e4). Measured max |error| vs the erf
    GeLU on [-10, 10]: 7.2e-3 in plaintext, 7.4e-3 under SPU (the largest of 100 runs; PUMA's:
    2.0e-2); mean 1.40e-3 (PUMA's: 1.43e-3).
    Horner's rule runs in s = x^2 directly (its coefficients are large enough for 18 fraction
    bits: the smallest, 2.06e-3, is 540 units), which saves the truncation of scaling x^2.
    Cost: 2 comparisons (one call), 3 multiplications, 2 truncations by constants, 2 selects:
    556 bytes per element under ABY3 (PUMA's: 920).
    """
    return _even_piecewise(x, GELU_T, GELU_Q, scale=1.0)


@input_limit(square_limit)
def silu(x):
    """SiLU as x/2 + q(x^2) inside |x| < 7, relu(x) outside (``SILU_Q``, degree 6 in x^2).

    Domain: as :func:`gelu`, |x| < 8192 at FM64/18. Measured max |error| vs x*sigmoid(x) on
    [-10, 10]: 6.4e-3 in plaintext, 8.2e-3 under SPU (PUMA's: 7.2e-2); mean 2.7e-3 (PUMA's: 6.9e-3).
    Cost: 2 comparisons (one call), 6 multiplications, 3 truncations by constants, 2 selects.
    """
    return _even_piecewise(x, SILU_T, SILU_Q, scale=SILU_T**2)


def exp_on_clip_domain(z):
    """exp(z) on [-EXP_CLIP, 0] as p(z / 8)^8, p the fitted cubic ``EXP_P`` (ours).

    p runs by Horner's rule in v = z / (8 k) with k = EXP_P[3]^(-1/3), which makes it monic:
    p = ((v + b2) v + b1) v + b0 (one truncation, two multiplications); three squarings follow.
    Domain: z in [-14, 0]; outside it the result is meaningless and :func:`softmax` drops it.
    Measured max |error| on [-14, 0]: 5.5e-5 (PUMA's first-order base with 8 squarings: 1.1e-3).
    """
    k = EXP_P[3] ** (-1.0 / 3.0)
    b0, b1, b2 = EXP_P[0], EXP_P[1] * k, EXP_P[2] * k * k
    v = z * (1.0 / (2**EXP_ITERS * k))
    e = ((v + b2) * v + b1) * v + b0
    for _ in range(EXP_ITERS):
        e = e * e
    return e


def softmax(x, where=None):
    """Softmax with max subtraction, a clip at -14 and a cubic-base exponential.

    softmax(x)_i = c_i e_i / sum_j c_j e_j, e_i = exp_on_clip_domain(z_i), z_i = x_i - max_j x_j,
    c_i = [z_i > -14] and m_i (the mask). Masked entries are set to -MASK_FILL before the max so
    they cannot win it; the public mask costs nothing, the clip one comparison and one select
    per entry (it is what keeps scores far below the max at exactly 0, however far).
    Domain: any scores the fixed-point format holds. Measured max |error| per probability on
    rows of 128 scores in [-20, 20], half of them masked: 2.3e-4 in plaintext, 2.1e-4 under SPU
    (PUMA's: 4.0e-3).
    Cost: a row max, 1 comparison, 1 select, 1 truncation and 6 multiplications per entry,
    1 reciprocal per row.
    """
    return clipped_softmax(x, where, lambda total, n: jnp.reciprocal(total))


def clipped_softmax(x, where, reciprocal):
    """:func:`softmax` with ``reciprocal(row_sums [..., 1], row_length)`` for the normaliser."""
    if where is not None:
        x = jnp.where(where, x, -MASK_FILL)
    z = x - jnp.max(x, axis=-1, keepdims=True)
    keep = z > -EXP_CLIP
    if where is not None:
        keep = keep & where
    e = jnp.where(keep, exp_on_clip_domain(z), 0.0)
    return e * reciprocal(jnp.sum(e, axis=-1, keepdims=True), x.shape[-1])


def row_mean(x):
    """Mean over the last axis, accurate in fixed point.

    ``jnp.mean`` multiplies by the constant 1/n, which 18 fraction bits hold only to about
    1e-3 relative for n = 768 (341 units); that error, times a row's offset, dominated LayerNorm's
    error under SPU. Here the row is reduced against a public vector of 2^k/n (in [1, 2): a
    relative error of 2^-18) and scaled by 2^-k: two truncations per row, nothing per element.
    """
    n = x.shape[-1]
    k = max(0, int(math.ceil(math.log2(n))))
    weights = jnp.full((n,), 2.0**k / n, x.dtype)
    return (x @ weights)[..., None] * (2.0**-k)  # [..., n] @ [n] -> [...] -> [..., 1]


def row_mean_square(x):
    """Mean of x^2 over the last axis, from the diagonal of the rows' Gram matrix.

    Under ABY3 a secret matrix product costs communication per *output*, so for R rows of n the
    Gram matrix [R, R] is cheaper than R * n elementwise squares while R <= n (a BERT layer at
    128 tokens: 16384 outputs instead of 98304 products); beyond that the squares are used.
    The 1/n is applied as a 1x1 product by 2^k/n and a scaling by 2^-k, for the reason given in
    :func:`row_mean` (written as two plain constant multiplications, XLA folds them back).
    """
    n = x.shape[-1]
    rows = x.reshape(-1, n)  # [R, n]
    if rows.shape[0] > n:
        return row_mean(x * x)
    k = max(0, int(math.ceil(math.log2(n))))
    sums = jnp.diagonal(rows @ rows.T)[:, None]  # [R, R] -> [R, 1]
    mean = (sums @ jnp.full((1, 1), 2.0**k / n, x.dtype)) * (2.0**-k)  # [R, 1]
    return mean.reshape(x.shape[:-1] + (1,))


def _rsqrt_refined(v):
    """rsqrt(v) with one Newton step r (1.5 - ((v/2) r) r) on top of SPU's approximation,
    ordered so that no intermediate is small: r^2 first would keep only a few fixed-point units
    for a large v (at v = 1.7e4, 15 units: a 3 % error in a norm's output)."""
    r = jax.lax.rsqrt(v)
    return r * (1.5 - ((0.5 * v) * r) * r)


def layer_norm(x, weight, bias, eps):
    """(x - mean) * (rsqrt(var + eps) * weight) + bias with a Newton-refined rsqrt per row.

    Exact in plaintext (float rounding, < 3e-6). Under SPU, on rows of 768 with offsets up to
    +-2 and scales 0.2..5: max |error| 2.8e-4, the largest of 100 runs (median 1.7e-4: SPU's
    truncations are randomised, so the error varies from run to run). PUMA's set (``jnp.mean``
    and a plain rsqrt): 9.6e-3. Cost: 2 multiplications per element and the variance from a Gram matrix
    (:func:`row_mean_square`); the rsqrt, the Newton step and the row means per row.
    """
    return normalized(x, weight, bias, eps, _rsqrt_refined)


def normalized(x, weight, bias, eps, rsqrt):
    """:func:`layer_norm` (``bias`` given) or :func:`rms_norm` (``bias`` None) with ``rsqrt``."""
    centered = x if bias is None else x - row_mean(x)
    y = centered * (rsqrt(row_mean_square(centered) + eps) * weight)
    return y if bias is None else y + bias


def rms_norm(x, weight, eps):
    """x * rsqrt(mean(x^2) + eps) * weight with accurate row means and a Newton-refined rsqrt.

    Under SPU, rows as for :func:`layer_norm`: max |error| 2.6e-4, the largest of 100 runs
    (median 1.7e-4; PUMA's set: 3.3e-3).
    """
    return normalized(x, weight, None, eps, _rsqrt_refined)


def embed(onehot, table):
    """Rows of ``table`` for client-made one-hot rows: onehot [..., V] @ table [V, D]. Exact."""
    return jnp.einsum("...v,vd->...d", onehot, table)


OPS = dataclasses.replace(
    puma_set.OPS,
    name="puma-fast",
    gelu=gelu,
    gelu_tanh=gelu,
    silu=silu,
    softmax=softmax,
    layer_norm=layer_norm,
    rms_norm=rms_norm,
    embed=embed,
    plan=ExecutionPlan(client_onehot=True),
    description="ours: even-polynomial GeLU/SiLU, cubic-base clipped softmax, Gram-matrix norms, client one-hot rows",
)
