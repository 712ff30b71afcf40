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
from puma.models import llama, load
from puma.models.loading import join_projections
from puma.protocols import chat, fixed, lean
from puma.protocols.base import FixedPoint

from puma import calibration, protocols
from puma.calibration import Ranges
from puma.program import Program

#: Plaintext bounds (float32 evaluation of the fitted functions; measured in brackets).
EXP_TOP_REL = 5e-4  # a weight at the maximum's level or the one below [4.6e-4]
EXP_THIRD_ABS = 5e-5  # at the third level, against the row maximum's weight (> 1) [2.8e-5]
RSQRT_REL = 7.1e-4  # the chords' 7.04e-4 ...
NORM_REL = 1e-3  # a norm's outputs: the rsqrt's, the squares' sum in float32 [8.8e-4]
GRID = 2.0 ** -(chat.GRID_BITS + 1)  # ... plus the rounding of the table to bin_rows' grid
RECIPROCAL_REL = 9e-4  # the chords' 8.34e-4
SOFTMAX_ABS = 1e-3  # [9.5e-4]: the reciprocal's error times the largest probability
ACTIVATION_ABS = {"silu": 1e-2, "gelu": 5.5e-3, "gelu_tanh": 5.5e-3}  # fits [9.8e-3, 5.3e-3, 5.4e-3]
#: Under SPU (ABY3 FM64/18): the same functions with truncation noise (measured in brackets).
SPU_SOFTMAX_ABS = 1.3e-3  # [1.07e-3, largest of 3 runs]
SPU_NORM_REL = 1e-3  # of a row's largest output: the chords' 7e-4 plus truncation noise [7.0e-4]
#: ... for a row at the domain's low end (mean square 2^-13): each square and each weighted entry
#: is truncated to 2^-18, which is 3.4e-4 of entries of 2^-6.5 and, over 576 squares, 3 sd of
#: 5.7e-4 of the rsqrt: 7e-4 + 3.4e-4 + 5.7e-4 [1.3e-3 in a failing run; the bound 1e-3 failed 2 runs of 14]
SPU_NORM_EDGE_REL = 2e-3
SPU_ACTIVATION_ABS = 1.1e-2  # SiLU's fit 9.8e-3 plus truncation noise [9.76e-3]
SPU_RECIPROCAL_REL = 1e-3  # the chords' 8.34e-4 + truncation noise [8.34e-4]


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


def _rows_with_maxima(seed: int, width: int = 37):
    """Rows whose maxima cover the domain (random, exactly on ladder thresholds, both edges),
    with scores down to three times the limit below."""
    rng = np.random.default_rng(seed)
    limit = chat.SCORE_LIMIT
    peaks = np.concatenate(
        [rng.uniform(-limit, limit, 2000), chat.ladder()[chat.ladder() >= -limit], [-limit, limit - 1e-3]]
    )
    rows = np.minimum(rng.uniform(-3 * limit, limit, (len(peaks), width)), peaks[:, None])
    rows[np.arange(len(peaks)), rng.integers(0, width, len(peaks))] = peaks
    return rows.astype(np.float32)


def test_exp_levels_against_the_exponential_on_the_whole_domain():
    """Weights e^(x - t_(K-1)) at the maximum's level K and the two below, 0 lower down; every
    score within two ladder steps of its row's maximum keeps its weight."""
    rows = _rows_with_maxima(0)
    got = np.asarray(chat.exp_levels(jnp.asarray(rows)), np.float64)
    ladder = chat.ladder().astype(np.float64)
    top = (rows.max(-1, keepdims=True) > ladder).sum(-1, keepdims=True)  # K
    level = (rows[..., None] > ladder).sum(-1)
    want = np.exp(rows.astype(np.float64) - (ladder[0] + chat.LADDER_STEP * (top - 1)))
    near = level >= top - 1
    third = level == top - 2
    assert np.abs(got[near] / want[near] - 1).max() <= EXP_TOP_REL
    assert np.abs(got[third] - want[third]).max() <= EXP_THIRD_ABS
    assert np.all(got[level < top - 2] == 0.0)
    gap = rows.max(-1, keepdims=True) - rows
    assert np.all(got[gap < 2 * chat.LADDER_STEP] > 0.0)


def test_exact_integer_products_in_plaintext_and_the_bin_rows():
    x = np.array([1.5, -2.25, 100.0], np.float32)
    assert np.asarray(fixed.times_integer(x, np.array([3, 0, -2], np.int32))).tolist() == [4.5, 0.0, -200.0]
    got = fixed.scaled_sum(jnp.stack([x, x * x], -1), [0.5, -0.25], 20)
    np.testing.assert_allclose(np.asarray(got), 0.5 * x - 0.25 * x * x, rtol=1e-6)
    bins = lean.Bins.fit(0.5, 576 * 2.0**-14, 576 * 2.0**20, 2.0 ** (1 / 16))
    total = np.geomspace(576 * 2.0**-14, 576 * 2.0**20, 997).astype(np.float32)[:, None]
    onehot = lean.onehot_bins(jnp.asarray(total), bins.thresholds)
    table = bins.values[:, None]
    on_grid = np.round(table * 2.0**chat.GRID_BITS) / 2.0**chat.GRID_BITS
    want = np.asarray(onehot @ jnp.asarray(on_grid, jnp.float32), np.float64)
    got = np.asarray(chat.bin_rows(jnp.asarray(total), bins.thresholds, table), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("width", [1, 37, 576, 768])
def test_rsqrt_bins_over_the_sum_domain_and_its_edges(width):
    low, high = width * chat.RSQRT_LOW, width * chat.RSQRT_HIGH
    total = np.exp(np.linspace(np.log(low), np.log(high), 40001))
    total = np.concatenate([total, [low, high, low * chat.BIN_RATIO, high / chat.BIN_RATIO]]).astype(np.float32)
    got = np.asarray(chat._rsqrt_sum(jnp.asarray(total[:, None]), width), np.float64)[:, 0]
    want = math.sqrt(width) / np.sqrt(total.astype(np.float64))
    excess = np.abs(got - want) - (RSQRT_REL * want + 4 * GRID)  # the chords, and the table's grid
    assert excess.max() <= 0, excess.max()


@pytest.mark.parametrize("site", ["norm", "softmax"])
def test_bins_scale_a_row_as_the_row_times_the_guess(site):
    """LinearBins.times (the form the norms and the softmax use: a SmolLM2 row of 576, a
    softmax row of 16 scores) against numpy's y c x^-power over the whole domain and its edges:
    within the chords' error plus the table's grid."""
    if site == "norm":
        bins, power, scale = chat._rsqrt_bins(576), 0.5, math.sqrt(576)
        low, high = 576 * chat.RSQRT_LOW, 576 * chat.RSQRT_HIGH
    else:
        low, high = 1.0, 16 * math.exp(chat.LADDER_STEP)
        bins, power, scale = chat._reciprocal_bins(high), 1.0, 2.0**chat.RECIPROCAL_BITS
    x = np.exp(np.linspace(np.log(low), np.log(high), 4001))
    x = np.concatenate([x, [low, high], bins.thresholds * 0.9999, bins.thresholds * 1.0001])
    x = x[(x >= low) & (x <= high)].astype(np.float32)[:, None]
    y = np.random.default_rng(0).uniform(-3.0, 3.0, (x.shape[0], 5)).astype(np.float32)
    got = np.asarray(bins.times(jnp.asarray(x), jnp.asarray(y)), np.float64)
    want = y * scale * x.astype(np.float64) ** -power
    excess = np.abs(got - want) - ((bins.error + 1e-6) * np.abs(want) + 8 * GRID * np.abs(y))
    assert excess.max() <= 0, excess.max()


@pytest.mark.parametrize("keys", [1, 37, 1024])
def test_scaled_reciprocal_over_softmax_sums(keys):
    high = keys * math.exp(chat.LADDER_STEP)
    s = np.exp(np.linspace(0.0, np.log(high), 40001)).astype(np.float32)
    got = np.asarray(chat.scaled_reciprocal(jnp.asarray(s[:, None]), high), np.float64)[:, 0]
    rel = np.abs(got * s.astype(np.float64) / 2.0**chat.RECIPROCAL_BITS - 1)
    assert rel.max() <= RECIPROCAL_REL, rel.max()


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
    assert np.abs(got / want - 1).max() <= NORM_REL, "rms_norm relative error"
    centered = x.astype(np.float64) - x.mean(-1, keepdims=True)
    want = centered / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-6) * w + b
    got = np.asarray(chat.layer_norm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), 1e-6), np.float64)
    assert np.abs(got - want).max() <= NORM_REL * np.abs(want - b).max() + 1e-5


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
def test_activations_against_numpy_everywhere(name):
    """Inside the pieces, at their edges and far outside (0 below, x above, exactly)."""
    x = np.concatenate([np.linspace(-12, 12, 48001), chat.ACTIVATION_EDGES[name], [-1e4, -300, 300, 1e4]])
    x = x.astype(np.float32)
    got = np.asarray(getattr(chat, name)(jnp.asarray(x)), np.float64)
    want = chat._ACTIVATIONS[name](x[:-4].astype(np.float64))
    _check(got[:-4], want, ACTIVATION_ABS[name], name)
    assert got[-4:].tolist() == [0.0, 0.0, 300.0, 1e4]


# -- the plan: fusions change no output ------------------------------------------------------


def test_fused_projections_and_rotary_change_no_output():
    """llama-debug in plaintext: forward, prefill and a decode step with the fusions equal the
    plain model (float32 rounding); the forward pass too on the weights as the owner stores them
    for a fused set (q/k/v and gate/up side by side)."""
    model = load("llama-debug")
    exact = protocols.get("exact")
    fused = exact.with_plan(fused_projections=True, fused_rotary=True)
    ids = np.array([[1, 5, 9, 17, 33, 2], [3, 4, 5, 6, 7, 8]], np.int32)
    plain, joined = model.module(exact), model.module(fused)
    variables = model.variables()
    _check(joined.apply(variables, ids)[0], plain.apply(variables, ids)[0], 1e-5, "forward")
    side_by_side = {"params": join_projections(load("llama-debug", lazy=True).lazy, llama.JOINS).materialize()}
    _check(joined.apply(side_by_side, ids)[0], plain.apply(variables, ids)[0], 1e-5, "forward, joined weights")
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


def test_the_owner_shares_fused_sets_projections_side_by_side(monkeypatch):
    """Under MPC (sim) the owner opens the weights joined for puma-chat, not for puma-fast, and
    puma-chat's tokens equal its plaintext run's."""
    from puma.api import SecureModel
    from puma.runtime.roles import OwnerSpec

    opened, real = [], OwnerSpec.open

    def spy(spec):
        lazy = real(spec)
        opened.append(lazy.names())
        return lazy

    monkeypatch.setattr(OwnerSpec, "open", spy)
    want = SecureModel.from_pretrained("llama-debug", approx="puma-chat").generate_ids([[5, 6, 7, 8]], 3).tokens
    for approx, joined in (("puma-chat", True), ("puma-fast", False)):
        opened.clear()
        with SecureModel.from_pretrained("llama-debug", approx=approx, backend="sim") as m:
            got = m.generate_ids([[5, 6, 7, 8]], 3).tokens
        names = set(opened[-1])
        assert ("layers_0/self_attn/qkv_proj/kernel" in names) == joined, approx
        assert ("layers_0/mlp/gate_up_proj/kernel" in names) == joined, approx
        assert ("layers_0/mlp/up_proj/kernel" in names) != joined, approx
        if approx == "puma-chat":
            assert got == want


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
    x[0] += 59.5 - x[0].max(-1, keepdims=True)  # row maxima at the top and the bottom of the domain
    x[1] += -59.5 - x[1].max(-1, keepdims=True)
    x[2, :, :5] = -1000.0  # far below the ladder: exactly 0, whatever the polynomial does there
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
    rel = np.array([SPU_NORM_REL, SPU_NORM_REL, SPU_NORM_EDGE_REL])
    assert np.all(np.abs(got - want).max(-1) <= rel * np.abs(want).max(-1)), "rms_norm under SPU"
    big = _spu(session, "rms_big", lambda s, p: chat.rms_norm(s["x"], s["w"], 1e-6), {"x": x[3:] * 2.0**-9, "w": w})
    want = _rms(x[3:], w, 1e-6)
    assert np.all(np.abs(big - want).max(-1) <= SPU_NORM_REL * np.abs(want).max(-1)), "pre-scaled large row"


def test_exact_integer_products_under_spu(session):
    """The ring products of :mod:`puma.protocols.fixed` give the float ones under SPU, and a
    public integer costs no message."""
    x = np.array([[1.5, -2.25, 100.0, -7.0]], np.float32)
    n = np.array([[3, 0, -2, 5]], np.int32)
    with session.measure() as cost:
        got = _spu(session, "times", lambda s, p: fixed.times_integer(s["x"], p["n"]), {"x": x}, {"n": n})
    assert got.tolist() == (x * n).tolist() and cost.total_send_actions == 0
    got = _spu(session, "times_secret", lambda s, p: fixed.times_integer(s["x"], s["n"]), {"x": x, "n": n})
    assert got.tolist() == (x * n).tolist()
    got = _spu(
        session,
        "scaled_sum",
        lambda s, p: fixed.scaled_sum(jnp.stack([s["x"], s["x"]], -1), [0.3, -0.05], 18),
        {"x": x},
    )
    _check(got, 0.25 * x, 2.0**-16, "scaled sum under SPU")


def test_activations_and_reciprocal_under_spu(session):
    grid = np.linspace(-10, 10, 2001).astype(np.float32)[None]
    got = _spu(session, "silu", lambda s, p: chat.silu(s["x"]), {"x": grid})
    _check(got, _silu(grid), SPU_ACTIVATION_ABS, "silu under SPU")
    high = 37 * math.exp(chat.LADDER_STEP)
    s = np.array([1.0, 1.5, 37.0, 1000.0, high * 0.99], np.float32)[:, None]  # both ends of the domain
    got = _spu(session, "reciprocal", lambda a, p: chat.scaled_reciprocal(a["s"], high), {"s": s})
    rel = np.abs(got * s / 2.0**chat.RECIPROCAL_BITS - 1).max()
    assert rel <= SPU_RECIPROCAL_REL, rel


def _tied_rows(seed: int, width: int) -> np.ndarray:
    """Rows of small integers (many exact ties, the maximum often repeated), one constant row."""
    rows = np.random.default_rng(seed).integers(-4, 4, (4, width)).astype(np.float32)
    rows[0] = 1.5
    return rows


@pytest.mark.parametrize("width", [1, 2, 3, 8, 9, 17, 300, chat.PAIR_LIMIT + 1, 5000])
def test_argmax_plaintext_is_numpys_first_maximum(width):
    rows = _tied_rows(width, width)
    assert np.asarray(chat.argmax(jnp.asarray(rows))).tolist() == np.argmax(rows, -1).tolist()


def test_argmax_under_spu_is_numpys_first_maximum(session):
    """Pair rounds, then groups of 8 (the last one filled with copies where the width leaves it
    short), on tied rows and on a row past PAIR_LIMIT."""
    for width in (11, 1001, chat.PAIR_LIMIT * 2 + 3):
        rows = _tied_rows(width, width)
        got = _spu(session, f"argmax_{width}", lambda s, p: chat.argmax(s["x"]), {"x": rows})
        assert got.astype(int).tolist() == np.argmax(rows, -1).tolist(), width
