"""PUMA's MPC-friendly non-linearities (Dong et al., arXiv 2307.12533, §4).

Each function is a pure ``jax.numpy`` function: the same code runs in plaintext (where its
approximation error is measured exactly) and under SPU (where fixed-point error adds to it).
Error bounds quoted below are asserted by ``tests/test_protocols.py``; ``scripts/bench_protocols.py``
reproduces the full table.

Comparisons are the expensive primitive under MPC, so every function evaluates each power of x
once and shares its comparisons between segments.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from puma.protocols import exact
from puma.protocols.base import MASK_FILL, SpuSettings

# -- GeLU (PUMA §4.1, eq. 5) ------------------------------------------------------------------

#: Cubic on [-4, -1.95), constant first.
GELU_P3 = (-0.5054031199708174, -0.42226581151983866, -0.11807612951181953, -0.011034134030615728)
#: Degree 6 on [-1.95, 3], constant first.
GELU_P6 = (0.008526321541038084, 0.5, 0.3603292692789629, 0.0, -0.037688200365904236, 0.0, 0.0018067462606141187)
GELU_BREAKS = (-4.0, -1.95, 3.0)


def _poly(coeffs, powers):
    """sum_k coeffs[k] * powers[k] (powers[0] is 1), skipping zero coefficients."""
    out = coeffs[0]
    for c, p in zip(coeffs[1:], powers[1:]):
        if c:
            out = out + c * p
    return out


def gelu(x):
    """PUMA's piecewise-polynomial GeLU.

    gelu(x) = 0 for x < -4; P3(x) on [-4, -1.95); P6(x) on [-1.95, 3]; x for x > 3, with
    P3, P6 the coefficient tuples ``GELU_P3``, ``GELU_P6`` (PUMA eq. 5).
    Domain: all reals. Measured max |error| vs the erf GeLU on [-10, 10]: 2.0e-2 in plaintext
    (at x = 3, where P6(3) = 3.016 meets x), 1.8e-2 under SPU; mean 1.4e-3.
    Cost: 3 comparisons, powers x^2, x^3, x^4, x^6 (4 multiplications), 5 multiplications by
    constants, 3 selects: 920 bytes per element under ABY3.
    """
    x2 = x * x
    x3 = x2 * x
    x4 = x2 * x2
    x6 = x3 * x3
    p3 = _poly(GELU_P3, (1.0, x, x2, x3))
    p6 = _poly(GELU_P6, (1.0, x, x2, x3, x4, None, x6))
    below_m4, below_m195, above_3 = (x < GELU_BREAKS[0]), (x < GELU_BREAKS[1]), (x > GELU_BREAKS[2])
    middle = jnp.where(below_m195, jnp.where(below_m4, 0.0, p3), p6)
    return jnp.where(above_3, x, middle)


# -- SiLU (PUMA's LLaMA variant) ----------------------------------------------------------------

#: Quadratic on [-8, -4), constant first.
SILU_P2 = (-0.3067541139982155, -0.0819767021525476, -0.0055465625580307)
#: Degree 6 on [-4, 4], constant first.
SILU_P6 = (0.0085064025895951, 0.5, 0.2281430841728270, 0.0, -0.011113046708173, 0.0, 0.0002743776353465)
SILU_BREAKS = (-8.0, -4.0, 4.0)


def silu(x):
    """PUMA's piecewise-polynomial SiLU (x * sigmoid(x)).

    silu(x) = 0 for x < -8; P2(x) on [-8, -4); P6(x) on [-4, 4]; x for x > 4 (``SILU_P2``,
    ``SILU_P6``). Domain: all reals. Measured max |error| vs x*sigmoid(x) on [-10, 10]: 7.2e-2
    (just above x = 4, where silu(4) = 3.93 but the last piece gives x), in plaintext and under
    SPU; mean 6.9e-3.
    Cost: 3 comparisons, powers x^2, x^4, x^6 (3 multiplications), 3 selects.
    """
    x2 = x * x
    x4 = x2 * x2
    x6 = x4 * x2
    p2 = _poly(SILU_P2, (1.0, x, x2))
    p6 = _poly(SILU_P6, (1.0, x, x2, None, x4, None, x6))
    below_m8, below_m4, above_4 = (x < SILU_BREAKS[0]), (x < SILU_BREAKS[1]), (x > SILU_BREAKS[2])
    middle = jnp.where(below_m4, jnp.where(below_m8, 0.0, p2), p6)
    return jnp.where(above_4, x, middle)


# -- Softmax (PUMA §4.2) ------------------------------------------------------------------------

#: Exponents below this are set to 0: exp(-14) = 8.3e-7 < 2^-18, the FM64/18-bit resolution.
EXP_CLIP = -14.0
#: exp(x) ~ (1 + x / 2^EXP_ITERS)^(2^EXP_ITERS): EXP_ITERS squarings.
EXP_ITERS = 8


def exp_taylor(x, iters: int = EXP_ITERS):
    """exp(x) ~ (1 + x / 2^n)^(2^n) with n = ``iters`` squarings (PUMA §4.2).

    Domain: [-14, 0] (the softmax after max subtraction). Measured max |error| there
    (plaintext): 1.1e-3 at n = 8 (at x ~ -2); relative error at most x^2 / 2^(n+1).
    """
    y = 1.0 + x * (1.0 / 2**iters)
    for _ in range(iters):
        y = y * y
    return y


def softmax(x, where=None):
    """PUMA's softmax: subtract the row max, clip exponents below -14 to 0, one reciprocal per row.

    softmax(x)_i = e_i / sum_j e_j with e_i = exp_taylor(x_i - max x) if x_i - max x >= -14
    else 0. Masked entries (``where`` false) are set to -MASK_FILL first, so they fall far below
    the clip and get exactly 0. Domain: any scores with max - min < 2^EXP_ITERS (= 256) among
    unmasked entries. Measured max |error| per probability on rows of 128 scores in [-20, 20],
    half of them masked: 4.0e-3 in plaintext and under SPU.
    Cost: a row max (comparison tree), 1 comparison + 1 select per entry, EXP_ITERS
    multiplications per entry, 1 reciprocal per row, 1 multiplication per entry.
    """
    if where is not None:
        x = jnp.where(where, x, -MASK_FILL)
    z = x - jnp.max(x, axis=-1, keepdims=True)
    e = jnp.where(z < EXP_CLIP, 0.0, exp_taylor(z))
    return e * jnp.reciprocal(jnp.sum(e, axis=-1, keepdims=True))


# -- Normalisation (PUMA §4.3) ------------------------------------------------------------------


def layer_norm(x, weight, bias, eps):
    """LayerNorm through one reciprocal square root per row, no division.

    y = (x - mean) * rsqrt(var + eps) * weight + bias, var the biased variance. Exact in
    plaintext (float rounding, < 1e-6). Under SPU, on rows of 768 with offsets up to +-2 and
    scales 0.2..5: max |error| 9.6e-3, the largest of 100 runs (SPU's truncations are
    randomised), mostly from ``jnp.mean``'s constant 1/768 (see ``puma-fast`` for the fix).
    """
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return centered * (jax.lax.rsqrt(var + eps) * weight) + bias


def rms_norm(x, weight, eps):
    """RMSNorm through one reciprocal square root per row: x * rsqrt(mean(x^2) + eps) * weight.

    Exact in plaintext; under SPU (rows as for :func:`layer_norm`) max |error| 3.3e-3, the
    largest of 100 runs.
    """
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


# -- Embedding (PUMA §4.4) ----------------------------------------------------------------------


def embed(ids, table):
    """One-hot embedding: onehot(ids) @ table, the one-hot built by equality with an iota.

    Secret ids never become clear text: each is compared with every row index (a secret-public
    equality) and the resulting 0/1 matrix multiplies the secret table. Exact in plaintext;
    under SPU the table's fixed-point encoding, max |error| 3.8e-6.
    Cost: one equality per (token, vocabulary entry), one matrix product.
    """
    onehot = (ids[..., None] == jnp.arange(table.shape[0], dtype=ids.dtype)).astype(table.dtype)  # [..., V]
    return jnp.einsum("...v,vd->...d", onehot, table)


# -- Greedy token: tournament argmax -------------------------------------------------------------


def argmax(x):
    """Index of the largest entry over the last axis (first one on ties), by a pairwise tournament.

    Round r compares neighbours (2j, 2j+1) of the surviving values and keeps the larger with its
    index: ``take = x[2j+1] > x[2j]; x' = where(take, x[2j+1], x[2j]); i' = where(take, ...)``; an
    odd last entry passes to the next round unchanged. Neighbouring pairs keep surviving blocks
    in index order, so a strict ``>`` keeps the first maximum, exactly like ``jnp.argmax``.
    ceil(log2 n) rounds, n - 1 comparisons and selects in all.
    Source: the standard log-depth max tree (as in CrypTen's log-reduction argmax); SPU
    lowers ``jnp.argmax`` through a generic variadic reduce that selects on more operands.
    Domain: any values. Error: none (same index as ``jnp.argmax``, ties included; asserted in
    plaintext and under SPU). Measured at a GPT-2 vocabulary row (50257): 8.8 MB over the three
    parties and 542 send actions, against 41.3 MB and 2309 for SPU's ``jnp.argmax``.
    """
    index = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
    while x.shape[-1] > 1:
        x, index = tournament_round(x, index)
    return index[..., 0]


def tournament_round(x, index):
    """One round of :func:`argmax`: values and indices [..., n] -> [..., ceil(n / 2)]."""

    def halves(v, pairs):  # entries 2j and 2j+1 by a reshape: a strided slice would be a gather
        both = v[..., :pairs].reshape(*v.shape[:-1], pairs // 2, 2)  # [..., n // 2, 2]
        return both[..., 0], both[..., 1]

    pairs = x.shape[-1] // 2 * 2
    first, second = halves(x, pairs)  # [..., n // 2] each
    take = second > first
    winners = jnp.where(take, second, first)
    index_first, index_second = halves(index, pairs)
    winner_index = jnp.where(take, index_second, index_first)
    x = jnp.concatenate([winners, x[..., pairs:]], axis=-1)  # [..., ceil(n / 2)]
    index = jnp.concatenate([winner_index, index[..., pairs:]], axis=-1)
    return x, index


#: SPU settings PUMA relies on: one reciprocal per softmax row broadcast to the row.
PUMA_SPU = SpuSettings(compiler=(("enable_optimize_denominator_with_broadcast", True),))

#: tanh (BERT's pooler, one row per sentence) stays SPU's own.
OPS = dataclasses.replace(
    exact.OPS,
    name="puma",
    gelu=gelu,
    gelu_tanh=gelu,
    silu=silu,
    softmax=softmax,
    layer_norm=layer_norm,
    rms_norm=rms_norm,
    embed=embed,
    argmax=argmax,
    spu=PUMA_SPU,
    description="PUMA (arXiv 2307.12533): piecewise GeLU/SiLU, clipped Taylor softmax, rsqrt norms, one-hot embedding",
)
