"""puma-chat's functions against numpy, in plaintext and under SPU, inside and at the edges of
their declared domains; its plan changes no output; the preflight checks its softmax domain.

Oracles: float64 numpy (exp, 1/x, 1/sqrt(x), softmax, RMSNorm/LayerNorm, SiLU/GeLU), the
row maximum of each row, and the same model without the plan's fusions (plaintext, float32
rounding: 1e-5). Bounds are the documented errors (``puma.protocols.chat``), measured here in
float64 and under ABY3 FM64/18 (largest of 5 runs, rounded up; SPU's truncations are random).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from puma.models import load
from puma.protocols import chat
from puma.protocols.base import FixedPoint

from puma import calibration, protocols
from puma.calibration import Ranges
from puma.program import Program

#: Plaintext bounds (float32 evaluation of the fitted functions; measured in brackets).
EXP_REL = 2e-3  # [1.95e-3]
RSQRT_REL = 1.1e-2  # half a bin: 2^(1/32) - 1 = 1.09e-2
RECIPROCAL_REL = 1e-3  # bins' fit 9.47e-4
SOFTMAX_ABS = 1.1e-3  # [9.8e-4]: the reciprocal's error times the largest probability
#: Under SPU (ABY3 FM64/18): the same functions with truncation noise (measured in brackets).
SPU_SOFTMAX_ABS = 1.1e-3  # [7.3e-4]
SPU_NORM_REL = 1.2e-2  # of a row's largest output: the bins' 1.09e-2 plus truncation noise
SPU_SILU_ABS = 6e-2  # the fit's own 5.76e-2 dominates [5.3e-2 on the grid below]
SPU_RECIPROCAL_REL = 1.5e-3  # [9.5e-4 + 2^-18 relative]


def _check(actual, expected, atol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.max(np.abs(actual - expected))
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


def _softmax(x, mask=None):
    x = np.asarray(x, np.float64)
    if mask is not None:
        x = np.where(mask, x, -np.inf)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _rms(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _silu(x):
    x = np.asarray(x, np.float64)
    return x / (1 + np.exp(-x))


# -- plaintext: the fitted pieces over their whole domains -----------------------------------


def test_exp_window_relative_error_on_its_domain():
    z = np.linspace(-chat.EXP_CLIP, chat.MAX_STEP, 20001).astype(np.float32)
    rel = np.abs(np.asarray(chat.exp_window(jnp.asarray(z)), np.float64) / np.exp(z.astype(np.float64)) - 1)
    assert rel.max() <= EXP_REL, rel.max()


@pytest.mark.parametrize("width", [1, 37, 576, 768])
def test_rsqrt_bins_over_the_sum_domain_and_its_edges(width):
    low, high = width * chat.RSQRT_LOW, width * chat.RSQRT_HIGH
    total = np.exp(np.linspace(np.log(low), np.log(high), 40001))
    total = np.concatenate([total, [low, high, low * chat.BIN_RATIO, high / chat.BIN_RATIO]]).astype(np.float32)
    got = np.asarray(chat._rsqrt_sum(jnp.asarray(total[:, None]), width), np.float64)[:, 0]
    rel = np.abs(got * np.sqrt(total.astype(np.float64)) / math.sqrt(width) - 1)
    assert rel.max() <= RSQRT_REL, rel.max()


@pytest.mark.parametrize("keys", [1, 37, 1024])
def test_scaled_reciprocal_over_softmax_sums(keys):
    high = keys * math.exp(chat.MAX_STEP)
    s = np.exp(np.linspace(0.0, np.log(high), 40001)).astype(np.float32)
    got = np.asarray(chat.scaled_reciprocal(jnp.asarray(s[:, None]), high), np.float64)[:, 0]
    rel = np.abs(got * s.astype(np.float64) / 2.0**chat.RECIPROCAL_BITS - 1)
    assert rel.max() <= RECIPROCAL_REL, rel.max()


def test_row_max_bound_brackets_every_maximum():
    rng = np.random.default_rng(0)
    limit, step = chat.SCORE_LIMIT, chat.MAX_STEP
    peaks = np.concatenate(
        [rng.uniform(-limit, limit, 2000), np.arange(-limit + step, limit, step), [-limit + 1e-3, limit - 1e-3]]
    )  # random maxima, maxima exactly on thresholds, the domain's edges
    rows = rng.uniform(-3 * limit, 0, (len(peaks), 37)) + 0.0
    rows = np.minimum(rows, peaks[:, None])
    rows[np.arange(len(peaks)), rng.integers(0, 37, len(peaks))] = peaks
    rows = rows.astype(np.float32)
    bound = np.asarray(chat.row_max_bound(jnp.asarray(rows)))[:, 0]
    top = rows.max(-1)
    assert np.all(bound >= top), top[bound < top]
    assert np.all(bound < top + step), top[bound >= top + step]


@pytest.mark.parametrize("width", [8, 37, 128, 1024])
def test_softmax_plaintext_against_numpy(width):
    rng = np.random.default_rng(width)
    x = rng.uniform(-20, 20, (64, width)).astype(np.float32)
    x[:8] += 47.5 - x[:8].max(-1, keepdims=True)  # row maxima at the top of the domain
    x[8:16] += -47.5 - x[8:16].max(-1, keepdims=True)  # and at its bottom
    mask = rng.random((64, width)) > 0.3
    mask[:, 0] = True
    mask[:16] = True
    mask[32:] = True
    got = chat.softmax(jnp.asarray(x), jnp.asarray(mask))
    _check(got, _softmax(x, mask), SOFTMAX_ABS, f"softmax width {width}")
    assert np.all(np.asarray(got)[~mask] == 0.0)


def test_norms_plaintext_against_numpy():
    rng = np.random.default_rng(1)
    scales = np.geomspace(0.02, 900, 16)[:, None]  # mean squares 4e-4 .. 8e5: the domain
    x = (rng.standard_normal((16, 576)) * scales).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 576).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, 576).astype(np.float32)
    got = np.asarray(chat.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6), np.float64)
    want = _rms(x, w, 1e-6)
    assert np.abs(got / want - 1).max() <= RSQRT_REL, "rms_norm relative error"
    centered = x.astype(np.float64) - x.mean(-1, keepdims=True)
    want = centered / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-6) * w + b
    got = np.asarray(chat.layer_norm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), 1e-6), np.float64)
    assert np.abs(got - want).max() <= RSQRT_REL * np.abs(want - b).max() + 1e-5


# -- the plan: fusions change no output ------------------------------------------------------


def test_fused_projections_and_rotary_change_no_output():
    """llama-debug in plaintext: forward, prefill and a decode step with the fusions equal the
    plain model (float32 rounding)."""
    model = load("llama-debug")
    exact = protocols.get("exact")
    fused = exact.with_plan(fused_projections=True, fused_rotary=True)
    ids = np.array([[1, 5, 9, 17, 33, 2], [3, 4, 5, 6, 7, 8]], np.int32)
    plain, joined = model.module(exact), model.module(fused)
    variables = model.variables()
    _check(joined.apply(variables, ids)[0], plain.apply(variables, ids)[0], 1e-5, "forward")
    slots = 16
    got, cache = joined.apply(variables, ids[:, :5], None, None, slots, method="prefill")
    want, cache_ref = plain.apply(variables, ids[:, :5], None, None, slots, method="prefill")
    _check(got, want, 1e-5, "prefill")
    for single in (ids[:1], ids):  # one token (the block-diagonal product) and a batch
        mask = np.ones((len(single), slots), np.int32)
        position = np.full((len(single), 1), 5, np.int32)
        c, cr = (
            tuple({k: v[: len(single)] for k, v in layer.items()} for layer in cache),
            tuple({k: v[: len(single)] for k, v in layer.items()} for layer in cache_ref),
        )
        got = joined.apply(variables, single[:, 5:], mask, position, c, 5, method="decode")[0]
        want = plain.apply(variables, single[:, 5:], mask, position, cr, 5, method="decode")[0]
        _check(got, want, 1e-5, f"decode batch {len(single)}")


def test_preflight_checks_the_softmax_row_maximum():
    sites = {
        "layers_0/self_attn/score_row_max": (chat.SCORE_LIMIT / calibration.MARGIN * 1.01, 0.0, 1.0, 1),
        "layers_0/input_layernorm/rms_norm_input": (3.0, 0.5, 2.0, 64),
    }
    ranges = Ranges("m", "test", sites)
    found = calibration.plan(ranges, protocols.get("puma-chat"), FixedPoint("FM64", 18), "silu")
    assert not found.ok and "attention row maximum (puma-chat)" in found.findings[0].line()
    assert calibration.plan(ranges, protocols.get("puma-fast"), FixedPoint("FM64", 18), "silu").ok


# -- under SPU -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session():
    from puma.runtime import open_session

    s = open_session("sim", protocol="aby3", field="FM64", fxp_bits=18)
    s.load_params({})
    yield s
    s.close()


def _spu(session, name, fn, secret, public=None):
    program = Program(f"chat_{name}", lambda p, st, sec, pub: ({"y": fn(sec, pub)}, {}), key=(name,))
    return np.asarray(session.run(program, secret, public or {})["y"], np.float64)


def test_softmax_under_spu(session):
    rng = np.random.default_rng(2)
    x = rng.uniform(-20, 20, (9, 4, 37)).astype(np.float32)
    x[0] += 47.5 - x[0].max(-1, keepdims=True)  # row maxima at the top and the bottom of the domain
    x[1] += -47.5 - x[1].max(-1, keepdims=True)
    mask = rng.random((9, 4, 37)) > 0.3
    mask[..., 0] = True
    mask[:2] = True
    got = _spu(session, "softmax", lambda s, p: chat.softmax(s["x"], p["mask"]), {"x": x}, {"mask": mask})
    _check(got, _softmax(x, mask), SPU_SOFTMAX_ABS, "softmax under SPU")
    assert np.all(got[~mask] == 0.0)


def test_norms_under_spu_inside_and_at_the_domain_edges(session):
    rng = np.random.default_rng(3)
    width = 576
    # mean squares 9 (typical), and near the domain's ends: 2^-13 and 2^18
    scales = np.array([3.0, 3.0, 2.0**-6.5, 2.0**9], np.float32)[:, None]
    x = (rng.standard_normal((4, width)) * scales).astype(np.float32)
    w = rng.uniform(0.5, 1.5, width).astype(np.float32)
    got = _spu(session, "rms", lambda s, p: chat.rms_norm(s["x"], s["w"], 1e-6), {"x": x[:3], "w": w})
    want = _rms(x[:3], w, 1e-6)
    assert np.all(np.abs(got - want).max(-1) <= SPU_NORM_REL * np.abs(want).max(-1)), "rms_norm under SPU"
    big = _spu(session, "rms_big", lambda s, p: chat.rms_norm(s["x"], s["w"], 1e-6), {"x": x[3:] * 2.0**-9, "w": w})
    want = _rms(x[3:], w, 1e-6)
    assert np.all(np.abs(big - want).max(-1) <= SPU_NORM_REL * np.abs(want).max(-1)), "pre-scaled large row"


def test_activations_and_reciprocal_under_spu(session):
    grid = np.linspace(-10, 10, 2001).astype(np.float32)[None]
    got = _spu(session, "silu", lambda s, p: chat.silu(s["x"]), {"x": grid})
    _check(got, _silu(grid), SPU_SILU_ABS, "silu under SPU")
    high = 37 * math.exp(chat.MAX_STEP)
    s = np.array([1.0, 1.5, 37.0, 1000.0, high * 0.99], np.float32)[:, None]  # both ends of the domain
    got = _spu(session, "reciprocal", lambda a, p: chat.scaled_reciprocal(a["s"], high), {"s": s})
    rel = np.abs(got * s / 2.0**chat.RECIPROCAL_BITS - 1).max()
    assert rel <= SPU_RECIPROCAL_REL, rel
