"""The exact set: the plaintext reference functions, written to be fixed-point safe.

These are the functions every approximation is compared against. They equal the PyTorch
definitions used by Hugging Face (erf GeLU, tanh GeLU, biased-variance LayerNorm, RMSNorm in
float32). Under SPU they are lowered with SPU's own default approximations of exp, erf, tanh,
rsqrt and reciprocal, which is the ``spu`` baseline set.

Masking never relies on ``exp`` of a huge negative number (SPU's exp is wrong there): masked
scores are replaced by ``-MASK_FILL`` so they cannot win the row max, and the exponentials are
multiplied by the mask so masked positions get exactly 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from puma.protocols.base import MASK_FILL, Ops, SpuSettings, cube_limit, input_limit, square_limit


@input_limit(square_limit)
def gelu(x):
    """GeLU(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2))), exact.

    Under SPU (the ``spu`` set) its erf squares x: measured right up to |x| = 1.4e4 at FM64/18
    and 5.9e4 at FM64/16, garbage beyond; declared limit sqrt of the product limit (8192 at
    FM64/18).
    """
    return jax.nn.gelu(x, approximate=False)


@input_limit(cube_limit)
def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's ``gelu_new``.

    Under SPU x^3 overflows: measured right up to |x| = 386 at FM64/18, garbage from 574;
    declared limit the cube root of the product limit (406 at FM64/18).
    """
    return jax.nn.gelu(x, approximate=True)


@input_limit(lambda fx: 500.0)
def silu(x):
    """SiLU(x) = x * sigmoid(x).

    Under SPU its sigmoid is right only for |x| < ~517 whatever the format (measured at FM64
    with 12 to 22 fraction bits and FM128 with 26 and 40: first wrong at 517); declared limit 500.
    """
    return x * jax.nn.sigmoid(x)


def tanh(x):
    """tanh(x)."""
    return jnp.tanh(x)


def softmax(x, where=None):
    """softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x) over the last axis.

    With ``where``, masked entries get probability exactly 0: they are set to ``-MASK_FILL``
    before the max and their exponentials are multiplied by the mask.
    """
    if where is None:
        e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
        return e / jnp.sum(e, axis=-1, keepdims=True)
    keep = where.astype(x.dtype)
    x = jnp.where(where, x, -MASK_FILL)
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)) * keep
    return e / jnp.sum(e, axis=-1, keepdims=True)


def layer_norm(x, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(var + eps) * weight + bias


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    ms = jnp.mean(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(ms + eps) * weight


def embed(ids, table):
    """table[ids]: a gather (SPU evaluates it obliviously when ids are secret)."""
    return jnp.take(table, ids, axis=0)


def argmax(x):
    """Index of the largest entry over the last axis (first one on ties)."""
    return jnp.argmax(x, axis=-1).astype(jnp.int32)


OPS = Ops(
    name="exact",
    gelu=gelu,
    gelu_tanh=gelu_tanh,
    silu=silu,
    tanh=tanh,
    softmax=softmax,
    layer_norm=layer_norm,
    rms_norm=rms_norm,
    embed=embed,
    argmax=argmax,
    description="plaintext reference functions (under SPU: SPU's default exp/erf/rsqrt/reciprocal)",
)

#: The SPU baseline: the same functions, lowered by SPU with its default settings.
SPU_OPS = dataclasses.replace(
    OPS,
    name="spu",
    description="jax.nn-style functions as SPU lowers them by default (baseline)",
    spu=SpuSettings(compiler=(("enable_optimize_denominator_with_broadcast", False),)),  # SPU's own default
)
