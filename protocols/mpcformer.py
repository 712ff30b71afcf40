"""MPCFormer's "2Quad" approximations (Li et al., ICLR 2023), the published baseline.

They change the function rather than approximate it: MPCFormer recovers accuracy by knowledge
distillation, which puma does not do, so with pretrained weights this set loses accuracy. It is
here to report that loss honestly next to PUMA. Functions MPCFormer does not replace (norms,
SiLU, the embedding) are taken from the PUMA set.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from puma.protocols import puma as puma_set
from puma.protocols.base import input_limit, square_limit

#: Quad GeLU: 0.125 x^2 + 0.25 x + 0.5 (constant first).
QUAD_GELU = (0.5, 0.25, 0.125)
#: 2Quad softmax shift c in (x + c)^2.
QUAD_SHIFT = 5.0


@input_limit(square_limit)
def gelu(x):
    """Quad GeLU: 0.125 x^2 + 0.25 x + 0.5 (MPCFormer §3.2).

    Not an approximation of GeLU: max |difference| on [-10, 10] is 10.5 (at x = -10), mean 2.4.
    One multiplication, no comparison. Domain under SPU: |x| below the square root of the
    product limit.
    """
    return QUAD_GELU[0] + QUAD_GELU[1] * x + QUAD_GELU[2] * (x * x)


def softmax(x, where=None):
    """2Quad softmax: (x + c)^2 / sum_j (x_j + c)^2 with c = 5, masked entries zeroed.

    Not an approximation of softmax (it is not shift-invariant): on rows of 128 scores in
    [-20, 20] the max |difference| per probability is 0.69, mean 1.1e-2. One multiplication per
    entry and one reciprocal per row; no max, no exponential.
    """
    q = (x + QUAD_SHIFT) * (x + QUAD_SHIFT)
    if where is not None:
        q = jnp.where(where, q, 0.0)
    return q * jnp.reciprocal(jnp.sum(q, axis=-1, keepdims=True))


#: GeLU and softmax replaced; everything else (norms, SiLU, embedding, SPU settings) from PUMA.
OPS = dataclasses.replace(
    puma_set.OPS,
    name="mpcformer",
    gelu=gelu,
    gelu_tanh=gelu,
    softmax=softmax,
    description="MPCFormer 2Quad (ICLR 2023): quadratic GeLU and softmax; needs distillation to keep accuracy",
)
