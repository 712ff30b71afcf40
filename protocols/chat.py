"""``puma-chat``: few messages per generated token (ours).

A decode step is a chain of small dependent operations, so its latency on a network is its
number of messages. Most of them sit in SPU's comparison (8 send actions per party, one batched
call), each multiplication (1, plus 1-2 for its truncation), the row maximum of the softmax
(one comparison and one select per level of a tree: 11 per doubling of the cache) and the
refining steps of reciprocals. This set keeps every function a function of the whole input
domain the calibration preflight declares, and spends messages only where a dependency
forces them:

- **Softmax without a maximum.** Every score is compared with a public ladder of thresholds
  6 apart in one batched comparison; its level (the thresholds below it) and the row's top
  level (the thresholds some score passes: an OR over the row) give each score its weight
  e^(x - t_(K-1)) as a public level weight times a degree-8 polynomial on the level
  (:func:`exp_levels`); levels more than two below the top get exactly 0. No tree, no clip
  comparison, no squarings; the normaliser is a binned linear reciprocal with a public scale
  that keeps 16 more bits of the probabilities.
- **Integers where a factor is one.** Level weights, the polynomial's coefficients and the
  tables are integers or values on a 2^-18 grid, so products by them need no truncation and
  sums of them telescope exactly (:mod:`puma.protocols.fixed`, :func:`bin_rows`).
- **Reciprocals and reciprocal square roots without refining steps.** Both are
  continuous piecewise-linear guesses on geometric bins (:class:`LinearBins`: chords, 8.3e-4
  and 7.0e-4 relative error). Continuity matters under MPC: a value that truncation noise
  moves across a bin edge changes the guess by a slope, not a step (piecewise-constant rsqrt
  bins stepped by 2.2 %, and moved SmolLM2's logits by up to 1.1 from the same set in
  plaintext). A table row is read by the comparison bits times the table's differences,
  without building a one-hot (4 send actions less each).
- **Norms in three steps:** the row's squares and the weighted row come out of one
  elementwise product [x | x] * [x | w]; the binned reciprocal square root of the squares'
  sum (the 1/n folded into its table), read as the row times a bin's intercept and one
  scale (:meth:`LinearBins.times`: the guess itself is never formed).
- **Activations as piecewise cubics** on a few public edges (one comparison call, the
  piece's coefficients read from a table, Horner's rule): SiLU errs by 9.8e-3 (puma-lean's
  relu(x) - p(|x|): 5.8e-2), GeLU by 5.4e-3.
- **Argmax in wide rounds:** pairs while many logits remain, then groups of 8 whose 28 pairs
  are compared in one call (:func:`argmax`); bits two operations read are converted to
  arithmetic once (:func:`puma.protocols.fixed.arithmetic`).
- **Plan:** all heads in one product (``fused_heads``), the query/key/value and gate/up
  projections each as one product (``fused_projections``), the rotary embedding and the
  query's 1/sqrt(d) as one product by a public matrix (``fused_rotary``), and the last
  block's rows only.

Send actions are per party under ABY3 FM64/18, from SPU's profiler (``tests/test_chat.py``
asserts the errors; ``puma bench latency`` measures a decode step by model site).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from puma.protocols import fixed, lean, puma
from puma.protocols.base import ExecutionPlan, input_limit, variance_domain

#: Rows the softmax is right for: |row maximum| below this (checked by the calibration preflight).
SCORE_LIMIT = 60.0
#: Spacing of the threshold ladder: a score's level is the number of thresholds below it.
LADDER_STEP = 6.0
#: Levels that keep their weight: the row maximum's and the two below it (scores more than
#: 2 LADDER_STEP below the maximum, weight below e^-12, get probability 0, as PUMA's clip at -14).
KEPT_LEVELS = 3
#: Degree of the exponential's polynomial on one level.
EXP_DEGREE = 8
#: Float tables read by :func:`bin_rows` are rounded to multiples of 2^-GRID_BITS, the finest
#: grid every fixed-point format puma uses (FM64/18 and up) holds exactly.
GRID_BITS = 18
#: Fraction bits of the exponential's integer coefficients and of 1/LADDER_STEP: a value
#: times 2^bits must stay below FM64/18's product limit (2^26) before it is scaled back.
COEFFICIENT_BITS, SCALE_BITS = 18, 22
#: Fraction bits of the level weights (integers, so that a dropped level's weight is exactly 0).
#: The compiler may form q times the integer weight before scaling it back by 2^-WEIGHT_BITS,
#: so the largest weight, e^LADDER_STEP 2^WEIGHT_BITS, must stay well below FM64/18's product
#: limit of 2^26: measured under SPU, 15 bits (2^23.7) right, 17 bits (2^25.7) wrong.
WEIGHT_BITS = 15
#: The softmax normaliser is 2^RECIPROCAL_BITS / sum, so probabilities keep that many more bits.
RECIPROCAL_BITS = 16
#: Bin ratio of the softmax's piecewise-linear reciprocal (its chords err by 8.3e-4).
BIN_RATIO = 2.0 ** (1 / 12)
#: Bin ratio of the norms' piecewise-linear reciprocal square root, in the sum of squares (7.0e-4).
RSQRT_RATIO = 2.0 ** (1 / 8)
#: Mean squares the norms are right for, as puma-lean's: under MPC the preflight's pre-scale
#: keeps rows at 2^-10 or more, but a plaintext run has no pre-scale, and random presets' rows
#: have mean squares near 4e-4 (2^-11.3).
RSQRT_LOW, RSQRT_HIGH = lean.RSQRT_LOW, lean.RSQRT_HIGH


def bin_rows(x, thresholds: np.ndarray, table: np.ndarray):
    """The rows table[bin of x] of a public table [m, c] for x [..., 1] among m - 1 increasing
    ``thresholds``: table[m-1] - sum_j [x <= t_j] (table[j+1] - table[j]).

    One batched comparison; its bits (integers) times the public differences needs no
    truncation, and no one-hot is built (building one by concatenating shifted bits costs 4
    more send actions per party under ABY3). The table is first rounded to multiples of
    2^-GRID_BITS, so that its differences are exact in fixed point with that many fraction bits
    or more and the sums telescope exactly: rounded one by one, the differences of SmolLM2's
    rsqrt table erred by 1.8 % at its small end under SPU. The sum runs from the last row,
    the smallest of the decreasing tables read here, so that in float32 a small entry sums
    few differences."""
    table = np.round(np.asarray(table, np.float64) * 2.0**GRID_BITS) / 2.0**GRID_BITS
    steps = np.diff(table, axis=0).astype(np.float32)  # [m - 1, c]
    below = 1 - (x > jnp.asarray(thresholds, x.dtype)).astype(jnp.int32)  # [..., m - 1]
    return jnp.asarray(table[-1].astype(np.float32)) - below @ jnp.asarray(steps)


@dataclasses.dataclass(frozen=True)
class LinearBins:
    """A piecewise-linear guess of c x^-power on geometric bins [e_j, e_j r).

    Bits [x > e_j] come from one batched comparison; their product with the public table's
    differences gives the bin's intercept a_j, slope b_j and scale 2^24 / e_j
    (:func:`bin_rows`: no truncation); u = x (2^24 / e_j) 2^-24 lies in [1, r) (one
    multiplication, one truncation) and the guess is a_j + b_j u (one multiplication). The slope is taken
    in u rather than in x because a slope in x falls below the fixed-point resolution for large
    x (at x = 6e8 a reciprocal square root's is 8e-13).
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
        slope = (ratio**-power - 1.0) / (ratio - 1.0)  # the chord of u^-power over [1, r]
        line = np.array([1.0 - slope, slope])
        u = np.linspace(1.0, ratio, 257)
        residual = np.abs((line[0] + line[1] * u) * u**power - 1)
        scales = scale * edges[:-1] ** -power  # c x^-power = c e_j^-power u^-power
        table = np.stack([scales * line[0], scales * line[1], 2.0**cls.SCALE_BITS / edges[:-1]], axis=1)
        return cls(edges[1:-1], table, float(residual.max()))

    def guess(self, x):
        """The guess at x [..., 1] -> [..., 1]."""
        line = bin_rows(x, self.thresholds, self.table)  # [..., 3]
        u = (line[..., 2:] * x) * 2.0**-self.SCALE_BITS  # x / e_j in [1, r)
        return line[..., :1] + line[..., 1:2] * u

    @functools.cached_property
    def intercept_table(self) -> np.ndarray:
        """[m, 2]: the intercept a_j and k 2^SCALE_BITS / e_j per bin, k = b_j / a_j (the chord
        of u^-power over [1, r] is scaled per bin, so k is one value up to rounding)."""
        slope = self.table[:, 1] / self.table[:, 0]  # k
        return np.stack([self.table[:, 0], self.table[:, 2] * slope], axis=1)

    def times(self, x, y):
        """y * guess(x) for x [..., 1] and a row y [..., n], as (y a_j) (1 + k x / e_j).

        With k folded into the scale column (:attr:`intercept_table`), x's scale and y a_j come
        out of one elementwise product (n + 1 entries) and the guess is never formed: after the
        bins three products and truncations remain where ``y * guess(x)`` takes four, at the
        price of one more n-entry product ((y a_j) times the scale). Error: as :meth:`guess`
        times y, within 2^-f of it."""
        line = bin_rows(x, self.thresholds, self.intercept_table)  # [..., 2]
        left = jnp.concatenate([line[..., 1:], jnp.broadcast_to(line[..., :1], y.shape)], axis=-1)  # [..., 1 + n]
        both = left * jnp.concatenate([x, y], axis=-1)  # [..., 1 + n]: k x scale, y a_j
        ku = both[..., :1] * 2.0**-self.SCALE_BITS  # k x / e_j
        return both[..., 1:] * (1.0 + ku)


@functools.lru_cache(maxsize=None)
def _bins(power: float, scale: float, low: float, high: float, ratio: float = BIN_RATIO) -> LinearBins:
    return LinearBins.fit(power, scale, low, high, ratio)


def _reciprocal_bins(high: float, bits: int = RECIPROCAL_BITS) -> LinearBins:
    """The bins of :func:`scaled_reciprocal`: 2^bits / s on [1, high]."""
    return _bins(1.0, 2.0**bits, 1.0, high)


def scaled_reciprocal(s, high: float, bits: int = RECIPROCAL_BITS):
    """2^bits / s for s in [1, high] (shape [..., 1]) from :class:`LinearBins` alone.

    Domain: [1, high]. Measured max relative error 8.3e-4 in float64 (the chords'; a
    softmax row's probabilities then sum to 1 within it; asserted at 1e-3 in plaintext and
    1.5e-3 under SPU). Cost: one comparison with 12 log2(high) thresholds per row, two
    multiplications and two truncations.
    """
    return _reciprocal_bins(high, bits).guess(s)


def ladder() -> np.ndarray:
    """The public thresholds t_j = t_0 + j LADDER_STEP from t_0 = -SCORE_LIMIT - (KEPT_LEVELS - 1)
    LADDER_STEP up to SCORE_LIMIT: a row maximum in the domain lies above t_(KEPT_LEVELS - 1), so
    every score its kept levels hold lies above t_0 (level 0, below t_0, never has weight)."""
    low = -SCORE_LIMIT - (KEPT_LEVELS - 1) * LADDER_STEP
    return (low + LADDER_STEP * np.arange(int(round((SCORE_LIMIT - low) / LADDER_STEP)))).astype(np.float32)


@functools.lru_cache(maxsize=None)
def exp_coefficients(step: float = LADDER_STEP, degree: int = EXP_DEGREE) -> tuple[float, ...]:
    """q(u) ~ e^(step u) on [0, 1] (constant first), fitted for the least largest relative
    error by reweighted least squares in float64."""
    u = np.linspace(0.0, 1.0, 4001)
    target = np.exp(step * u)
    weights = 1.0 / target
    for _ in range(40):
        coef = np.polynomial.polynomial.polyfit(u, target, degree, w=weights)
        residual = np.abs(np.polynomial.polynomial.polyval(u, coef) / target - 1)
        weights = weights * (1 + 4 * residual / residual.max())
    return tuple(float(c) for c in coef)


@functools.lru_cache(maxsize=None)
def level_weights(levels: int) -> np.ndarray:
    """[L, L] integers: column K (the row maximum's level) holds
    round(2^WEIGHT_BITS e^((1/2 - d) step)) at row K - d for d < KEPT_LEVELS and K - d >= 1, zero
    elsewhere (lower levels and level 0, whose scores have no lower threshold, get no weight).
    The e^(step / 2) is q's e^(-step / 2) (:func:`exp_levels`): it centres both factors, so the
    smallest weight keeps 4 significant bits."""
    weights = np.zeros((levels, levels))
    for top in range(levels):
        for d in range(min(KEPT_LEVELS, top)):
            weights[top - d, top] = math.exp((0.5 - d) * LADDER_STEP)
    return fixed.integer_table(weights, WEIGHT_BITS)


def _powers(u):
    """[1, u, ..., u^EXP_DEGREE] along a new last axis from three products (u^2; u^3, u^4;
    u^5..u^8), each batched into one call."""
    u2 = u * u
    u34 = jnp.stack([u, u2], axis=-1) * u2[..., None]  # [..., 2]: u^3, u^4
    low = jnp.stack([u, u2, u34[..., 0], u34[..., 1]], axis=-1)  # [..., 4]: u..u^4
    high = low * u34[..., 1:]  # [..., 4]: u^5..u^8
    return jnp.concatenate([jnp.ones_like(low[..., :1]), low, high], axis=-1)[..., : EXP_DEGREE + 1]


def exp_levels(x):
    """Unnormalised weights w_i = e^(x_i - t_(K-1)) of a row's scores [..., S], K the row
    maximum's level, 0 below level K - 2: no maximum is formed.

    - Every score is compared with the ladder (one batched comparison: bits [..., S, J]); the
      thresholds some score of the row passes (an OR over the row) give K.
    - A score at level l lies in (t_(l-1), t_l], so x = t_(l-1) + LADDER_STEP u with u in
      (0, 1], and its weight is W(l, K) q(u): W(l, K) = 2^WEIGHT_BITS e^((l - K + 1/2)
      LADDER_STEP) an integer (:func:`level_weights`, 0 for a dropped level) and
      q(u) ~ e^((u - 1/2) LADDER_STEP).
    - W is linear in the passed thresholds and in the score's bits: integers (a product by
      public differences, then one product of the bits by the row's coefficients).
    - q is the fitted polynomial (:func:`exp_coefficients`) on powers of u (three products;
      its coefficients as integers: one truncation), and the weight is q times the integer W
      (:func:`puma.protocols.fixed.times_integer`: the product of the encodings) scaled by
      2^-WEIGHT_BITS (one truncation). Below the ladder (level 0) u is unbounded and q may be
      anything, even wrapped around the ring under SPU; W is exactly 0 there, so the exact
      product is exactly 0 and u needs no clamp. In float32 plaintext q stays finite for
      scores above -6e4 (u^8 below 3e38).

    Domain: rows whose maximum lies in [-SCORE_LIMIT, SCORE_LIMIT). Measured max relative
    error of a weight at the top two levels 4.6e-4 in float32 (the polynomial's), at the third
    under 3e-5 of the row maximum's weight (asserted in ``tests/test_chat.py``).
    """
    thresholds = ladder()
    above = x[..., None] > jnp.asarray(thresholds)  # [..., S, J]
    passed = jnp.any(above, axis=-2).astype(jnp.int32)  # [..., J]: thresholds some score of the row passes
    # a score at level l gets W[l, K] = W[0, K] + sum_j bits_j (W[j+1, K] - W[j, K]), and each
    # term is linear in passed: W[., K] = W[., 0] + sum_j passed_j (W[., j+1] - W[., j]), so one
    # product of public integers gives every term and one product of the bits by them the sum
    table = level_weights(thresholds.size + 1)  # [L, L]: level, maximum's level
    terms = np.concatenate([table[:1], np.diff(table, axis=0)], axis=0)  # [J+1, L]: W[0, K], differences
    per_top = np.diff(terms, axis=1).T  # [J, J+1]
    coefficients = passed @ jnp.asarray(per_top) + jnp.asarray(terms[:, 0])  # [..., J+1] integers
    bits = fixed.arithmetic(above)  # [..., S, J], read by a product and a sum
    weight = coefficients[..., :1] + jnp.sum(bits * coefficients[..., None, 1:], axis=-1)  # [..., S] at 2^WEIGHT_BITS
    level = jnp.sum(bits, axis=-1)  # [..., S]
    shift = fixed.integer_table(1.0 / LADDER_STEP, SCALE_BITS)
    u = fixed.times_integer(x, shift) * 2.0**-SCALE_BITS + (1.0 - float(thresholds[0]) / LADDER_STEP - level)
    polynomial = np.asarray(exp_coefficients()) * math.exp(-LADDER_STEP / 2)  # q(u) ~ e^(step (u - 1/2))
    q = fixed.scaled_sum(_powers(u), polynomial, COEFFICIENT_BITS)  # [..., S]
    return fixed.times_integer(q, weight) * 2.0**-WEIGHT_BITS


@input_limit(lambda fx: SCORE_LIMIT)  # of a row maximum
def softmax(x, where=None):
    """Softmax from :func:`exp_levels` and a binned scaled reciprocal: no maximum, no clip.

    Weights w_i = e^(x_i - t_(K-1)) lie in (1, e^LADDER_STEP] at the maximum's level, so a row's
    sum lies in [1, S e^LADDER_STEP]; the weights times 2^16 / sum (the bins of
    :func:`scaled_reciprocal`, read by :meth:`LinearBins.times`) are scaled back by 2^-16.
    Masked entries are set below the ladder before and to 0 after (public: free). Domain: rows
    whose maximum lies in [-SCORE_LIMIT, SCORE_LIMIT).
    Measured max |error| per probability 1.0e-3 in plaintext and 1.07e-3 under SPU (rows of up
    to 1024 scores, half masked, maxima at both ends of the domain; ``tests/test_chat.py``).
    Cost at SmolLM2's decode shape (9 heads x 16 slots), measured by ``puma bench latency``:
    53 send actions at the busiest party (puma-fast's: 126), 0.82 MB (all parties; puma-fast's:
    0.11 MB): the ladder compares S x 22 scores.
    """
    if where is not None:
        x = jnp.where(where, x, float(ladder()[0]) - LADDER_STEP / 2)
    e = exp_levels(x)
    high = x.shape[-1] * math.exp(LADDER_STEP)
    p = _reciprocal_bins(high).times(jnp.sum(e, axis=-1, keepdims=True), e) * 2.0**-RECIPROCAL_BITS
    return p if where is None else jnp.where(where, p, 0.0)


def _rsqrt_sum(total, n: int):
    """sqrt(n) / sqrt(total) for a row's sum of squares plus n eps (the sqrt(n) folded into the
    table): :class:`LinearBins` alone, continuous, no refining step.

    Domain: sums of n squares with mean in [2^-14, 2^20]. Measured max relative error 7.0e-4 in
    float64 (the chord's on bins of 2^(1/8)), plus 2^-19 absolute (the table on
    :func:`bin_rows`' grid). Cost: one comparison with 8 thresholds per octave (272 in all), two
    multiplications, two truncations.
    """
    return _rsqrt_bins(n).guess(total)


def _rsqrt_bins(n: int) -> LinearBins:
    """The bins of :func:`_rsqrt_sum` for rows of n entries."""
    return _bins(0.5, math.sqrt(n), n * RSQRT_LOW, n * RSQRT_HIGH, RSQRT_RATIO)


def _normalized(x, weight, bias, eps):
    """(x - mean) * rsqrt(mean square + eps) * weight (+ bias): the squares and the weighted row
    from one elementwise product [x | x] * [x | w], their sum, the weighted row times the binned
    rsqrt (continuous; :meth:`LinearBins.times`).

    Each square is truncated on its own (2^-18, random), so the sum of n errs by about
    sqrt(n) 2^-18, far below a row's sum at the preflight's smallest mean square (2^-10 n)."""
    n = x.shape[-1]
    centered = x if bias is None else x - lean.fast.row_mean(x)
    both = jnp.concatenate([centered, centered], axis=-1) * jnp.concatenate(
        [centered, jnp.broadcast_to(weight, centered.shape)], axis=-1
    )  # [..., 2n]: squares, then the weighted row
    total = jnp.sum(both[..., :n], axis=-1, keepdims=True) + n * eps  # [..., 1]
    y = _rsqrt_bins(n).times(total, both[..., n:])
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
    7e-4, the chords' (asserted in ``tests/test_chat.py``). Cost at SmolLM2's decode shape (one
    row of 576), measured by ``puma bench latency``: 21 send actions at the busiest party
    (puma-fast's: 71), 0.16 MB (all parties).
    """
    return _normalized(x, weight, None, eps)


#: Piece edges of the activations' piecewise cubics: 0 below the first, x above the last.
#: SiLU's three edges (a comparison per edge and entry: SmolLM2 compares 1536 entries per
#: layer) err by 9.8e-3, four by 2.7e-3; GeLU's three edges erred by 2e-2 or more, so it keeps
#: four. (Quartics on three pieces cost one more multiplication, and their rounded top
#: coefficient errs by 2^-19 x^4, 4.6e-3 at x = 7.)
ACTIVATION_EDGES = {
    "silu": (-7.0, -1.5, 1.5, 7.0),
    "gelu": (-8.0, -2.0, 0.0, 2.0, 8.0),
    "gelu_tanh": (-8.0, -2.0, 0.0, 2.0, 8.0),
}
#: Degree of each inner piece's polynomial.
ACTIVATION_DEGREE = 3

_ACTIVATIONS = {
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
}


@functools.lru_cache(maxsize=None)
def activation_pieces(name: str) -> np.ndarray:
    """[pieces, ACTIVATION_DEGREE + 1] coefficients (constant first) of ``name``'s piecewise
    polynomial: 0 below its first edge (:data:`ACTIVATION_EDGES`), x above its last, and on each
    inner piece the polynomial of least largest error (reweighted least squares in float64).
    :func:`bin_rows` reads them on its exact grid, so the outer pieces' zeros stay exactly
    zero however large x is."""
    f, edges, degree = _ACTIVATIONS[name], ACTIVATION_EDGES[name], ACTIVATION_DEGREE
    rows = [np.zeros(degree + 1)]
    for low, high in zip(edges[:-1], edges[1:]):
        x = np.linspace(low, high, 4001)
        weights = np.ones_like(x)
        for _ in range(30):
            coef = np.polynomial.polynomial.polyfit(x, f(x), degree, w=weights)
            residual = np.abs(np.polynomial.polynomial.polyval(x, coef) - f(x))
            weights = weights * (1 + 4 * residual / residual.max())
        rows.append(coef)
    rows.append(np.eye(degree + 1)[1])  # x
    return np.asarray(rows)


def _piecewise(x, name: str):
    """The piece's polynomial at x: coefficients from :func:`bin_rows` (one comparison of every
    entry with the edges), then Horner's rule (ACTIVATION_DEGREE multiplications)."""
    edges = np.asarray(ACTIVATION_EDGES[name])
    c = bin_rows(x[..., None], edges, activation_pieces(name))  # [..., D+1]
    y = c[..., -1]
    for k in range(ACTIVATION_DEGREE - 1, -1, -1):
        y = y * x + c[..., k]
    return y


def gelu(x):
    """GeLU (erf form) as a piecewise cubic on [-8, -2, 0, 2, 8] (:func:`activation_pieces`).

    Domain: all x (|x gate| under the product limit for the gated product). Measured max error
    5.3e-3 in float32 (the fit's 5.4e-3 and the coefficients' rounding; asserted in
    ``tests/test_chat.py``). Cost: one comparison (4 per entry), its bits' product with the
    public table, three multiplications."""
    return _piecewise(x, "gelu")


def gelu_tanh(x):
    """GeLU (tanh form, Gemma's) as :func:`gelu` with its own cubics (max error 5.4e-3)."""
    return _piecewise(x, "gelu_tanh")


def silu(x):
    """SiLU as a piecewise cubic on [-7, -1.5, 1.5, 7] (:func:`activation_pieces`).

    Domain: all x. Measured max error 9.8e-3 in float64 (puma-lean's relu(x) - p(|x|): 5.8e-2).
    Cost with the gated product at SmolLM2's decode shape (1536 entries), measured by ``puma
    bench latency``: 21 send actions at the busiest party (puma-fast's: 39), 1.18 MB (all
    parties)."""
    return _piecewise(x, "silu")


#: :func:`argmax` compares pairs while more than PAIR_LIMIT entries remain (a group of g compares
#: g (g - 1) / 2 pairs, so wide groups pay in bytes where entries are many), then groups of
#: GROUP. Measured at a 49 152-entry row under ABY3 FM64/18: 117 send actions at the busiest
#: party and 9.2 MB (all pairs: 181 and 8.7 MB; groups from 4 096 on: 109 and 9.7 MB; from 512:
#: 126 and 8.8 MB).
PAIR_LIMIT, GROUP = 2048, 8


def _group_winners(v, index):
    """One tournament round over groups of g neighbours: v, index [..., m, g] -> [..., m].

    Every pair (i < j) of a group is compared in one call (gt = v_j > v_i); entry i wins when it
    beats every earlier entry strictly and no later one beats it (the first maximum, as
    ``jnp.argmax``): an AND of g - 1 bits, and exactly one entry of a group wins. The winner's
    value is the sum of the entries times their winning bits (exact integer products)."""
    g = v.shape[-1]
    pairs = [(i, j) for i in range(g) for j in range(i + 1, g)]
    later = jnp.concatenate([v[..., j : j + 1] for _, j in pairs], axis=-1)  # [..., m, P]
    earlier = jnp.concatenate([v[..., i : i + 1] for i, _ in pairs], axis=-1)
    gt = later > earlier  # [..., m, P]: one comparison call
    literals = []
    for k in range(g):  # entry k: v_k > v_i for i < k, not v_j > v_k for j > k
        row = [gt[..., p] if j == k else ~gt[..., p] for p, (i, j) in enumerate(pairs) if k in (i, j)]
        literals.append(jnp.stack(row, axis=-1))  # [..., m, g - 1]
    wins = fixed.arithmetic(jnp.all(jnp.stack(literals, axis=-2), axis=-1))  # [..., m, g]
    value = jnp.sum(fixed.times_integer(v, wins), axis=-1)
    return value, jnp.sum(wins * index, axis=-1)


def argmax(x):
    """Index of the largest entry over the last axis (the first one on ties), by a tournament:
    pairs (:func:`puma.protocols.puma.tournament_round`) while more than PAIR_LIMIT entries
    remain, then groups of GROUP neighbours (:func:`_group_winners`), the last group filled
    with copies of the last entry (public positions; a copy never wins ahead of its original).

    A group round costs one comparison call, ceil(log2(g - 1)) rounds of ANDs and one product,
    whatever g is: three rounds of 8 do the work of nine pair rounds. Source: puma's log-depth
    tournament, with wider (k-ary) rounds once entries are few. Error: none (the index of
    ``jnp.argmax``, ties included; asserted in plaintext and under SPU). Cost at SmolLM2's
    vocabulary (49 152) under ABY3 FM64/18: 117 send actions at the busiest party, 9.2 MB (all
    parties); puma's pairs alone: 181 and 8.7 MB.
    """
    index = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
    while x.shape[-1] > PAIR_LIMIT:  # pairs: one bit per pair selects (fewer bytes than wins)
        x, index = puma.tournament_round(x, index)
    while x.shape[-1] > 1:
        n = x.shape[-1]
        g = min(GROUP, n)
        groups = -(-n // g)
        if groups * g > n:  # copies of the last entry fill its group: never ahead of it on a tie
            x = jnp.concatenate([x, jnp.repeat(x[..., -1:], groups * g - n, axis=-1)], axis=-1)
            index = jnp.concatenate([index, jnp.repeat(index[..., -1:], groups * g - n, axis=-1)], axis=-1)
        shape = (*x.shape[:-1], groups, g)  # [..., n / g, g]
        x, index = _group_winners(x.reshape(shape), index.reshape(shape))
    return index[..., 0]


OPS = dataclasses.replace(
    lean.OPS,
    name="puma-chat",
    gelu=gelu,
    gelu_tanh=gelu_tanh,
    silu=silu,
    softmax=softmax,
    layer_norm=layer_norm,
    rms_norm=rms_norm,
    argmax=argmax,
    plan=ExecutionPlan(
        client_onehot=True,
        fused_heads=True,
        last_layer_rows=True,
        fused_projections=True,
        fused_rotary=True,
    ),
    description="ours: ladder-level softmax without a maximum, binned reciprocal/rsqrt without steps, "
    "piecewise-cubic activations, fused projections",
)
