"""The :class:`Ops` container that models take their non-linearities from."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

#: Score given to masked attention positions before the softmax. Far below any real score and
#: far below PUMA's -14 clip, yet small enough to stay exact in FM64 with 18 fraction bits
#: (2^45 integer range): a fixed-point-safe replacement for ``finfo(float32).min``.
MASK_FILL = 1.0e4

Array = Any


@dataclasses.dataclass(frozen=True)
class FixedPoint:
    """The bounds of SPU's fixed-point format: a value v is stored as round(v 2^f) in the ring
    of integers modulo 2^bits (``field`` ``FM<bits>``, f = ``fxp_bits``).

    - ``product_limit`` = 2^(ring - 2 - 2f): a product (or a sum of products, as in a matrix
      product) is formed at 2f fraction bits before it is truncated back to f, so its magnitude
      must stay below this (2^26 at FM64/18). Measured under ABY3 FM64/18: squares of values up
      to 2^13 (2^26) are exact in 2000 of 2000 runs, at 2^13.4 (2^26.8) 706 of 2000 are wrong;
      a 576-term dot product is exact at a sum of 2^26 and wrong at 2^26.5.
    - ``value_limit`` = 2^(ring - 2 - f): any stored value.
    - ``resolution`` = 2^-f: the smallest step.
    """

    field: str = "FM64"
    fxp_bits: int = 18

    @property
    def ring_bits(self) -> int:
        return int(self.field.removeprefix("FM"))

    @property
    def product_limit(self) -> float:
        return 2.0 ** (self.ring_bits - 2 - 2 * self.fxp_bits)

    @property
    def value_limit(self) -> float:
        return 2.0 ** (self.ring_bits - 2 - self.fxp_bits)

    @property
    def resolution(self) -> float:
        return 2.0**-self.fxp_bits

    def describe(self) -> str:
        return f"{self.field}/{self.fxp_bits}"


def prescale(x: Array, eps: float, shift: int) -> tuple[Array, float]:
    """A norm's input and epsilon scaled by a public power of two: (x 2^-k, eps 4^-k), k = ``shift``.

    RMSNorm and LayerNorm are invariant under a common scale of their input when epsilon scales
    with the square: x / sqrt(mean(x^2) + eps) = (c x) / sqrt(mean((c x)^2) + c^2 eps), and the
    same for the centred input of LayerNorm. With c = 2^-k the scaling is exact in floating and
    in fixed point. k > 0 shrinks large rows (a truncation by k bits, one per element): a row of
    SmolLM2-135M's residual stream with |x| up to 22 550 (mean square 9.0e5, 5.2e8 summed over
    576 entries) needs k = 3 to keep its sum of squares below FM64/18's product limit of 2^26;
    it costs the input k bits of absolute resolution, and epsilon may fall below the format's
    resolution, which changes only rows whose mean square is near epsilon. k < 0 enlarges small
    rows by |k| doublings (additions: no communication), so that their mean square keeps more
    significant bits (random presets' rows have mean squares near 4e-4, 105 units at 18 bits).
    :mod:`puma.calibration` picks k per norm from the model's calibrated ranges.
    Domain: any x; k = 0 returns x unchanged (no operation). Error: none in plaintext beyond
    float rounding; under SPU the norm of rows with values up to 1e5 stays within the set's
    stated error (both asserted in ``tests/test_calibration.py``).
    """
    if shift > 0:
        x = x * (2.0**-shift)
    for _ in range(-shift):
        x = x + x
    return x, eps * 4.0**-shift


def input_limit(limit: Callable[[FixedPoint], float]):
    """Declare the largest input magnitude a function is right for, as a function of the format:
    ``@input_limit(lambda fx: math.sqrt(fx.product_limit))`` for a function that squares its input
    and compares the square. :mod:`puma.calibration` checks calibrated inputs against it."""

    def mark(fn):
        fn.input_limit = limit
        return fn

    return mark


def square_limit(fx: FixedPoint) -> float:
    """The largest |x| whose square x * x stays below the product limit."""
    return math.sqrt(fx.product_limit)


def cube_limit(fx: FixedPoint) -> float:
    """The largest |x| whose cube stays below the product limit."""
    return fx.product_limit ** (1.0 / 3.0)


def variance_domain(low: float, high: float):
    """Declare the mean squares (after :func:`prescale`) a norm function is right for, when
    its reciprocal square root has a domain narrower than the format's; :mod:`puma.calibration`
    chooses the shift to keep calibrated rows inside it."""

    def mark(fn):
        fn.variance_domain = (low, high)
        return fn

    return mark


@dataclasses.dataclass(frozen=True)
class SpuSettings:
    """SPU settings an approximation set relies on.

    ``runtime`` holds ``spu.RuntimeConfig`` field names and values (for example
    ``("fxp_exp_mode", "EXP_TAYLOR")``); ``compiler`` holds ``spu.CompilerOptions`` fields.
    Enum values are given by name. Stored as tuples of pairs so the set stays hashable.
    """

    runtime: tuple[tuple[str, Any], ...] = ()
    compiler: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """How a model runs besides its functions: input encoding, attention layout and the rows of
    the last block. A set carries one (:attr:`Ops.plan`); benchmarks compose others.

    Attributes:
        client_onehot: the client one-hot encodes token ids (it knows them) and shares the
            rows, instead of the parties building the one-hot from shared ids.
        fused_heads: attention multiplies all heads in one matrix product against block-diagonal
            keys and values (same outputs and bytes, one round instead of one per head).
        last_layer_rows: the last block computes queries, attention outputs and the feed-forward
            only for the rows the head reads (the last position when only the last logits are
            wanted, the [CLS] row for pooled and classifier heads); keys and values still come
            from every row, so outputs and caches are unchanged.
        fused_projections: independent projections of the same input run as one matrix product
            (LLaMA's query/key/value and gate/up, their kernels side by side along the outputs),
            so they cost one round instead of one each. The model owner stores them so when it
            shares the weights (the family's ``joins``); on weights published to parties, which
            any set may use, the program joins them (local on shares, a copy at every run).
        fused_rotary: the rotary embedding and the scores' 1/sqrt(d) (as d^(-1/4) on queries and
            on keys, which the cache keeps so scaled) are one product by a public per-position
            matrix in a decode step: one truncation instead of five.
    """

    client_onehot: bool = False
    fused_heads: bool = False
    last_layer_rows: bool = False
    fused_projections: bool = False
    fused_rotary: bool = False

    def as_middle_layer(self) -> "ExecutionPlan":
        """This plan with every block computed in full, as a middle layer is: per-layer cost cuts
        (the difference of a 1- and a 0-layer run) measure a middle layer, not the last."""
        return dataclasses.replace(self, last_layer_rows=False)


@dataclasses.dataclass(frozen=True)
class Ops:
    """A named set of the non-linear functions a Transformer needs.

    Every function is a pure ``jax.numpy`` function, so it traces to the same XLA whether it
    runs in plaintext or is compiled for SPU.

    Attributes:
        name: registry name (``"exact"``, ``"puma"``, ...).
        gelu: erf GeLU (BERT ``hidden_act="gelu"``).
        gelu_tanh: tanh GeLU (GPT-2 ``"gelu_new"``).
        silu: x * sigmoid(x) (LLaMA).
        tanh: tanh (BERT pooler).
        softmax: ``softmax(x, where)`` over the last axis; positions where ``where`` is false get
            probability exactly 0. This is the only place an attention mask is applied.
        layer_norm: ``layer_norm(x, weight, bias, eps)`` over the last axis.
        rms_norm: ``rms_norm(x, weight, eps)`` over the last axis.
        embed: ``embed(ids, table)``: rows of ``table`` for integer ``ids`` (the ids may be secret);
            with ``client_onehot`` it receives one-hot rows ``[..., V]`` instead of ids.
        argmax: ``argmax(x)`` over the last axis as an int32 index (greedy decoding under MPC).
        plan: how the model runs besides the functions (:class:`ExecutionPlan`).
        spu: SPU runtime/compiler settings the functions are designed for.
        description: one line for listings and reports.
    """

    name: str
    gelu: Callable[[Array], Array]
    gelu_tanh: Callable[[Array], Array]
    silu: Callable[[Array], Array]
    tanh: Callable[[Array], Array]
    softmax: Callable[[Array, Array | None], Array]
    layer_norm: Callable[[Array, Array, Array, float], Array]
    rms_norm: Callable[[Array, Array, float], Array]
    embed: Callable[[Array, Array], Array]
    argmax: Callable[[Array], Array]
    plan: ExecutionPlan = ExecutionPlan()
    spu: SpuSettings = SpuSettings()
    description: str = ""

    def with_plan(self, **changes) -> "Ops":
        """This set with its execution plan changed (``fused_heads=True``, ...)."""
        return dataclasses.replace(self, plan=dataclasses.replace(self.plan, **changes))

    def as_middle_layer(self) -> "Ops":
        """This set run as a middle layer (:meth:`ExecutionPlan.as_middle_layer`)."""
        return self.with_plan(last_layer_rows=False) if self.plan.last_layer_rows else self

    def activation(self, hf_name: str) -> Callable[[Array], Array]:
        """The function for a Hugging Face activation name (``hidden_act`` and friends)."""
        table = {
            "gelu": self.gelu,
            "gelu_new": self.gelu_tanh,
            "gelu_pytorch_tanh": self.gelu_tanh,
            "gelu_fast": self.gelu_tanh,
            "silu": self.silu,
            "swish": self.silu,
        }
        if hf_name not in table:
            raise ValueError(f"activation {hf_name!r} is not supported; supported: {', '.join(sorted(table))}")
        return table[hf_name]
