"""Products by integers that skip the truncation of SPU's fixed point.

SPU multiplies a fixed-point value by an integer as two fixed-point values: the integer is
converted, the product formed at 2f fraction bits and truncated back to f (a truncation costs
one or two send actions per party under ABY3, as many as the product itself). When one factor
is an integer, the truncation is not needed: the ring element of x (round(x 2^f)) times the
integer n is the ring element of x n. :func:`times_integer` says exactly that with its own JAX
primitive, lowered two ways:

- for SPU (JAX's ``interpreter`` platform, the one SPU's frontend lowers for): bitcast x to its
  ring element, multiply the integers, bitcast back. Nothing rounds; a secret n costs one
  product (one send action per party), a public n none;
- everywhere else (plaintext on CPU): x * n in float32.

The caller keeps |x n| below the product limit (2^26 at FM64/18) when a scaling by 2^-bits
follows: SPU's product by a public power of two was wrong beyond about 2^27 here (measured
under ABY3 FM64/18 with x n = 5.4e8, scaled by 2^-30: 0).
:func:`scaled_sum` builds on it: sum_k x_k c_k with public coefficients given at 2^bits, one
truncation for the whole sum instead of one per term.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import core, lax
from jax.interpreters import mlir

_times_integer_p = core.Primitive("puma_times_integer")


def _shape(x, n):
    return core.ShapedArray(jnp.broadcast_shapes(x.shape, n.shape), x.dtype)


def _float(x, n):
    return x * n.astype(x.dtype)


def _ring(x, n):
    ring = lax.bitcast_convert_type(x, jnp.int32)  # under SPU: the fixed-point encoding as an integer
    return lax.bitcast_convert_type(ring * n, x.dtype)


_times_integer_p.def_abstract_eval(_shape)
_times_integer_p.def_impl(_float)
mlir.register_lowering(_times_integer_p, mlir.lower_fun(_float, multiple_results=False))
mlir.register_lowering(_times_integer_p, mlir.lower_fun(_ring, multiple_results=False), platform="interpreter")


def times_integer(x, n):
    """x * n for float32 x and int32 n (broadcast), without a truncation under SPU.

    Exact in fixed point (the product of the encodings); the float32 product in plaintext.
    Cost under ABY3: one product (1 send action per party) for a secret n, none for a public
    n; comparison bits as n add their conversion to arithmetic shares (about 2 send actions).
    """
    x = jnp.asarray(x, jnp.float32)
    n = jnp.asarray(n, jnp.int32)
    x, n = jnp.broadcast_arrays(x, n)
    return _times_integer_p.bind(x, n)


def integer_table(values, bits: int) -> np.ndarray:
    """round(values 2^bits) as int32 (values are public): a table for :func:`times_integer`."""
    scaled = np.round(np.asarray(values, np.float64) * 2.0**bits)
    if np.abs(scaled).max(initial=0) >= 2**31:
        raise ValueError(f"a value times 2^{bits} does not fit int32")
    return scaled.astype(np.int32)


def scaled_sum(x, coefficients, bits: int, axis: int = -1):
    """sum_k x[..., k] c_k along ``axis`` with public c_k, truncated once.

    Each term is x_k times the integer round(c_k 2^bits) (no truncation), the sum is scaled by
    2^-bits (one truncation). Error: |c_k| 2^-bits per term from rounding the coefficients.
    Cost under ABY3: one truncation (1-2 send actions per party).
    """
    table = integer_table(coefficients, bits)
    shape = [1] * x.ndim
    shape[axis] = table.size
    return jnp.sum(times_integer(x, table.reshape(shape)), axis=axis) * 2.0**-bits


def arithmetic(bits):
    """Comparison bits [..., J] (bool) as int32 arithmetic shares, converted once.

    SPU keeps a comparison's result as a boolean share and converts it to arithmetic inside
    every op that reads it as a number, so bits read by two ops are converted twice. A product
    by the public identity converts them once (a public product: no message beyond the
    conversion). Measured in :func:`puma.protocols.chat.exp_levels` (bits read by a product and
    by a sum): 2 to 3 send actions per party fewer, 13 % fewer bytes in the softmax."""
    size = bits.shape[-1]
    return bits.astype(jnp.int32) @ jnp.eye(size, dtype=jnp.int32)
