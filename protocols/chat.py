"""``puma-chat``: few messages per generated token (ours).

A decode step is a chain of small dependent operations, so its latency on a network is its
number of messages. puma-lean sends about 275 per party per LLaMA layer; most of them sit in
SPU's comparison (8 send actions per party, one batched call), each multiplication (1, plus
1-2 for its truncation), the row maximum of the softmax (one comparison and one select per
level of a tree: 11 per doubling of the cache) and the refining steps of reciprocals. This set
keeps every function a function of the whole input domain the calibration preflight declares,
and spends messages only where a dependency forces them:

- **Softmax without a tree maximum.** Every score is compared with a public ladder of
  thresholds in one batched comparison; a second comparison asks which thresholds some score
  passes, which brackets the row maximum within :data:`MAX_STEP` (:func:`row_max_bound`) in
  two comparisons whatever the cache length (a tree takes 6 levels at 37 keys, 10 at 1024).
  Exponentials then run on [-14, MAX_STEP] (:func:`exp_window`) and the normaliser is a
  binned reciprocal with a public scale that keeps 16 more bits of the probabilities.
- **Reciprocals and reciprocal square roots without refining steps.** The softmax's
  reciprocal is a piecewise-linear guess on geometric bins (:class:`LinearBins`: one batched
  comparison, one product with a public table, two multiplications and a truncation: 18 send
  actions per party); the norms' reciprocal square root a piecewise-constant guess on bins of
  2^(1/16) (puma-lean's :class:`~puma.protocols.lean.Bins`: one comparison and one truncation,
  10 send actions, 1.1e-2 relative error). SPU's own take about 50 each.
- **Norms in three steps:** the row's squares and the weighted row come out of one
  elementwise product [x | x] * [x | w]; the reciprocal square root of the squares' sum is
  binned over sums (the 1/n folded into its table); one multiplication scales the row.
- **GeLU/SiLU** as puma-lean's relu(x) - p(|x|), with both of its comparisons in one call.
- **Plan:** all heads in one product (``fused_heads``), the query/key/value and gate/up
  projections each as one product (``fused_projections``), the rotary embedding and the
  query's 1/sqrt(d) as one product by a public matrix (``fused_rotary``), and the last
  block's rows only.

Send actions per call are per party, measured under ABY3 FM64/18 with SPU's profiler
(``tests/test_chat.py`` asserts the errors; ``puma bench latency`` measures a decode step by
model site). Measured on SmolLM2-135M (sim, FM64/18, a 5-token prompt): a decode step's busiest
party sends about 4 600 messages (puma-fast: 11 600), and greedy generation and WikiText-2
perplexity stay as the accuracy benchmark reports.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from puma.protocols import lean
from puma.protocols.base import MASK_FILL, ExecutionPlan, input_limit, variance_domain

#: Rows the softmax is right for: |row maximum| below this (checked by the calibration preflight).
SCORE_LIMIT = 60.0
#: Spacing of the threshold ladder that brackets a row's maximum.
MAX_STEP = 10.0
#: Scores more than this below the row maximum get probability 0 (as PUMA's clip).
EXP_CLIP = 14.0
#: Squarings of the exponential: exp(z) = p(z / 2^n)^(2^n) on [-EXP_CLIP, MAX_STEP].
EXP_ITERS = 4
#: Degree of the exponential's base polynomial.
EXP_DEGREE = 4
#: The softmax normaliser is 2^RECIPROCAL_BITS / sum, so probabilities keep that many more bits.
RECIPROCAL_BITS = 16
#: Bin ratio of the piecewise-linear guesses (the softmax's reciprocal).
BIN_RATIO = 2.0 ** (1 / 8)
#: Bin ratio of the norms' piecewise-constant reciprocal square root (in the sum of squares).
RSQRT_RATIO = 2.0 ** (1 / 16)
#: Mean squares the norms are right for, as puma-lean's: under MPC the preflight's pre-scale
#: keeps rows at 2^-10 or more, but a plaintext run has no pre-scale, and random presets' rows
#: have mean squares near 4e-4 (2^-11.3).
RSQRT_LOW, RSQRT_HIGH = lean.RSQRT_LOW, lean.RSQRT_HIGH


@dataclasses.dataclass(frozen=True)
class LinearBins:
    """A piecewise-linear guess of c x^-power on geometric bins [e_j, e_j r).

    Bits [x > e_j] come from one batched comparison; the one-hot rows are integer differences
    of them (free: :func:`puma.protocols.lean.onehot_bins`); one product with a public table
    [m, 3] gives the bin's intercept a_j, slope b_j and scale 2^24 / e_j (one truncation);
    u = x (2^24 / e_j) 2^-24 lies in [1, r) (one multiplication, one truncation) and the guess
    is a_j + b_j u (one multiplication). The slope
    is taken in u rather than in x because a slope in x falls below the fixed-point resolution
    for large x (at x = 6e8 a reciprocal square root's is 8e-13). Each bin's line is fitted for
    the least largest relative error over the bin.
    """

    thresholds: np.ndarray  # [m - 1] inner bin edges
    table: np.ndarray  # [m, 3] intercept, slope in u, 2^SCALE_BITS / e_j per bin
    error: float  # largest relative error over [low, high] in float64

    #: u = x / e_j is formed as (x * (2^SCALE_BITS / e_j)) * 2^-SCALE_BITS: the product stays
    #: below 2^SCALE_BITS r, under the product limit of FM64/18 (2^26).
    SCALE_BITS: ClassVar[int] = 24

    @classmethod
    def fit(cls, power: float, scale: float, low: float, high: float, ratio: float = BIN_RATIO) -> "LinearBins":
        count = max(1, int(math.ceil(math.log(high / low) / math.log(ratio))))
        edges = low * ratio ** np.arange(count + 1)
        u = np.linspace(1.0, ratio, 65)
        design = np.stack([np.ones_like(u), u], axis=1) / u[:, None] ** -power  # relative residuals
        weights = np.ones_like(u)
        for _ in range(12):  # reweighted least squares towards the minimax line of u^-power
            line = np.linalg.lstsq(design * weights[:, None], weights, rcond=None)[0]
            residual = np.abs(design @ line - 1)
            weights = weights * (1 + 8 * residual / max(residual.max(), 1e-30))
        scales = scale * edges[:-1] ** -power  # c x^-power = c e_j^-power u^-power
        table = np.stack([scales * line[0], scales * line[1], 2.0**cls.SCALE_BITS / edges[:-1]], axis=1)
        return cls(edges[1:-1], table, float(residual.max()))

    def guess(self, x):
        """The guess at x [..., 1] -> [..., 1]."""
        line = lean.onehot_bins(x, self.thresholds) @ jnp.asarray(self.table, x.dtype)  # [..., m] @ [m, 3]
        u = (line[..., 2:] * x) * 2.0**-self.SCALE_BITS  # x / e_j in [1, r)
        return line[..., :1] + line[..., 1:2] * u


@functools.lru_cache(maxsize=None)
def _bins(power: float, scale: float, low: float, high: float) -> LinearBins:
    return LinearBins.fit(power, scale, low, high)


def scaled_reciprocal(s, high: float, bits: int = RECIPROCAL_BITS):
    """2^bits / s for s in [1, high] (shape [..., 1]) from :class:`LinearBins` alone.

    Domain: [1, high]. Measured max relative error 9.5e-4 in float64 (the bins' fit; a
    softmax row's probabilities then sum to 1 within it; asserted at 1e-3 in plaintext and
    1.5e-3 under SPU). Cost: one comparison with 8 log2(high) thresholds per row, one product
    with the public table, two multiplications and one truncation: 18 send actions per party.
    """
    return _bins(1.0, 2.0**bits, 1.0, high).guess(s)


def row_max_bound(x):
    """A public-ladder bound m of each row's maximum: max(x) <= m < max(x) + MAX_STEP.

    Thresholds t_j = -SCORE_LIMIT + j MAX_STEP: count_j = #{i: x_i > t_j} (one comparison of
    every entry with every threshold, summed as integers), passed_j = [count_j > 0] (one
    comparison), m = t_0 + MAX_STEP * sum_j passed_j. Domain: rows whose maximum lies in
    [-SCORE_LIMIT, SCORE_LIMIT). Exact (m is a threshold). Cost: two comparisons
    whatever the row length; bytes grow with row length times 2 SCORE_LIMIT / MAX_STEP.
    """
    ladder = np.arange(-SCORE_LIMIT, SCORE_LIMIT, MAX_STEP, dtype=np.float32)  # [J]
    counts = jnp.sum((x[..., None] > jnp.asarray(ladder)).astype(jnp.int32), axis=-2)  # [..., S, J] -> [..., J]
    passed = jnp.sum((counts > 0).astype(jnp.int32), axis=-1, keepdims=True)  # [..., 1]
    return float(ladder[0]) + (passed * int(MAX_STEP)).astype(x.dtype)


@functools.lru_cache(maxsize=None)
def exp_coefficients(lo: float = -EXP_CLIP, hi: float = MAX_STEP, iters: int = EXP_ITERS, degree: int = EXP_DEGREE):
    """p(y) ~ e^y (constant first) fitted for the least largest relative error of p(z/2^n)^(2^n)
    on [lo, hi], by reweighted least squares in float64."""
    y = np.linspace(lo / 2**iters, hi / 2**iters, 4001)
    target = np.exp(y)
    weights = 1.0 / target
    for _ in range(40):
        coef = np.polynomial.polynomial.polyfit(y, target, degree, w=weights)
        residual = np.abs(np.polynomial.polynomial.polyval(y, coef) / target - 1)
        weights = weights * (1 + 4 * residual / residual.max())
    return tuple(float(c) for c in coef)


def exp_window(z):
    """exp(z) on [-EXP_CLIP, MAX_STEP] as p(z / 16)^16, p a fitted quartic (:func:`exp_coefficients`).

    p runs monic by Horner's rule in v = k z / 16 with k = c_4^(1/4): one truncation, three
    multiplications, then four squarings. Domain: [-14, 10]; outside it meaningless (the softmax
    drops those entries). Measured max relative error 1.95e-3 in float64, varying slowly with z
    (what a softmax sees is its variation across a row).
    """
    coef = exp_coefficients()
    k = coef[-1] ** (1.0 / EXP_DEGREE)
    monic = [c / k**i for i, c in enumerate(coef)]  # p(y) = sum monic[i] (k y)^i, monic[-1] = 1
    v = z * (k / 2**EXP_ITERS)
    e = v + monic[-2]
    for c in reversed(monic[:-2]):
        e = e * v + c
    for _ in range(EXP_ITERS):
        e = e * e
    return e


@input_limit(lambda fx: SCORE_LIMIT)  # of a row maximum
def softmax(x, where=None):
    """Softmax with a bracketed row maximum, a clip at -14 and a binned scaled reciprocal.

    z_i = x_i - m + MAX_STEP with m from :func:`row_max_bound`, so the largest z lies in
    (0, MAX_STEP] and every exponential is at most e^10 (its square roots stay far below the
    product limit) and the largest at least 1; entries with z <= -14 are 0; the normaliser is
    2^16 / sum from :func:`scaled_reciprocal` (a sum lies in [1, S e^10]) and the product is
    scaled back by 2^-16. Masked entries are set below every threshold (public: free).
    Domain: rows whose maximum lies in [-SCORE_LIMIT, SCORE_LIMIT). Measured max |error| per probability on rows of 128
    scores in [-20, 20], half masked: see ``tests/test_chat.py``.
    Cost: four comparisons, one select, four truncations, three multiplications and four
    squarings per row, whatever the row length: 79 send actions at the busiest party per call
    at SmolLM2's decode shape (9 heads x 16 slots; puma-fast's softmax: 126), 0.58 MB (all
    parties; puma-fast's: 0.11 MB), measured by ``puma bench latency``.
    """
    if where is not None:
        x = jnp.where(where, x, -MASK_FILL)
    z = x - row_max_bound(x) + MAX_STEP
    keep = z > -EXP_CLIP
    if where is not None:
        keep = keep & where
    e = jnp.where(keep, exp_window(z), 0.0)
    high = x.shape[-1] * math.exp(MAX_STEP)
    r = scaled_reciprocal(jnp.sum(e, axis=-1, keepdims=True), high)
    return (e * r) * 2.0**-RECIPROCAL_BITS


@functools.lru_cache(maxsize=None)
def _rsqrt_bins(n: int) -> lean.Bins:
    """Piecewise-constant sqrt(n) / sqrt(total) on bins of ratio :data:`RSQRT_RATIO` over the sums
    of n squares whose mean lies in [RSQRT_LOW, RSQRT_HIGH]."""
    bins = lean.Bins.fit(0.5, n * RSQRT_LOW, n * RSQRT_HIGH, RSQRT_RATIO)
    return lean.Bins(bins.thresholds, bins.values * math.sqrt(n))


def _rsqrt_sum(total, n: int):
    """sqrt(n) / sqrt(total) for a row's sum of squares plus n eps (the 1/n folded into the table).

    A piecewise-constant guess alone (:class:`puma.protocols.lean.Bins`): one batched comparison
    with 16 thresholds per octave of the sum (544 in all), one product with the public table; no
    refining step. Domain: sums of n squares with mean in [2^-14, 2^20]. Measured max relative
    error 1.09e-2 in float64 (2^(1/32) - 1, half a bin); SmolLM2-135M's WikiText-2 perplexity in
    plaintext (8 texts of 128 tokens): +0.18 % against exact, as with bins of 2^(1/32) (+0.30 %)
    or a linear guess with three more messages (+0.21 %).
    Cost: 8 send actions per party (the comparison) and 2 (the truncation); 544 comparisons per
    row (59 KB for one row under ABY3).
    """
    return _rsqrt_bins(n).guess(total)


def _normalized(x, weight, bias, eps):
    """(x - mean) * rsqrt(mean square + eps) * weight (+ bias): the squares and the weighted row
    from one elementwise product [x | x] * [x | w], their sum, the binned rsqrt, one multiplication.

    Each square is truncated on its own (2^-18, random), so the sum of n errs by about
    sqrt(n) 2^-18, far below a row's sum at the preflight's smallest mean square (2^-10 n)."""
    n = x.shape[-1]
    centered = x if bias is None else x - lean.fast.row_mean(x)
    both = jnp.concatenate([centered, centered], axis=-1) * jnp.concatenate(
        [centered, jnp.broadcast_to(weight, centered.shape)], axis=-1
    )  # [..., 2n]: squares, then the weighted row
    total = jnp.sum(both[..., :n], axis=-1, keepdims=True) + n * eps  # [..., 1]
    y = both[..., n:] * _rsqrt_sum(total, n)
    return y if bias is None else y + bias


@variance_domain(RSQRT_LOW, RSQRT_HIGH)
def layer_norm(x, weight, bias, eps):
    """LayerNorm with the three-product body of :func:`_normalized` (accurate row means).

    Domain: row variances plus eps in [2^-14, 2^20] (after the preflight's pre-scale); the
    product x @ x^T per row must stay below the product limit (the preflight's shift sees to it).
    Measured max |error|: see ``tests/test_chat.py``.
    """
    return _normalized(x, weight, bias, eps)


@variance_domain(RSQRT_LOW, RSQRT_HIGH)
def rms_norm(x, weight, eps):
    """RMSNorm x * rsqrt(mean(x^2) + eps) * weight in three steps (:func:`_normalized`).

    Domain as :func:`layer_norm`. Measured max relative error (of a row's largest output)
    1.09e-2, the bins' (asserted at 1.1e-2 in plaintext, 1.2e-2 under SPU). Cost at SmolLM2's
    decode shape (one row of 576): 20 send actions at the busiest party (puma-fast's: 71),
    0.17 MB (all parties), measured by ``puma bench latency``.
    """
    return _normalized(x, weight, None, eps)


def _relu_minus_poly(x, cutoff: float, coeffs):
    """puma-lean's relu(x) - [|x| < cutoff] p(|x|) with its three comparisons in one call."""
    positive, below, above = jnp.split(jnp.concatenate([x, cutoff - x, x + cutoff], axis=-1) > 0, 3, axis=-1)
    relu = jnp.where(positive, x, 0.0)
    t = relu + relu - x  # |x|
    p = coeffs[-1] * t + coeffs[-2]
    for c in reversed(coeffs[:-2]):
        p = p * t + c
    return relu - jnp.where(below & above, p, 0.0)


def gelu(x):
    """GeLU as puma-lean's (same coefficients and error: 1.55e-2 max on [-10, 10]), one comparison call."""
    return _relu_minus_poly(x, lean.GELU_T, lean.GELU_P)


def silu(x):
    """SiLU as puma-lean's (same coefficients and error: 5.8e-2 max on [-10, 10]), one comparison call.

    Cost with the gated product at SmolLM2's decode shape (1536 entries): 26 send actions at the
    busiest party (puma-fast's: 39), measured by ``puma bench latency``."""
    return _relu_minus_poly(x, lean.SILU_T, lean.SILU_P)


OPS = dataclasses.replace(
    lean.OPS,
    name="puma-chat",
    gelu=gelu,
    gelu_tanh=gelu,
    silu=silu,
    softmax=softmax,
    layer_norm=layer_norm,
    rms_norm=rms_norm,
    plan=ExecutionPlan(
        client_onehot=True,
        fused_heads=True,
        last_layer_rows=True,
        fused_projections=True,
        fused_rotary=True,
    ),
    description="ours: ladder-bracketed softmax max, binned reciprocal/rsqrt without steps, fused projections",
)
