"""puma-lean's structural savings change no output; its reciprocal and rsqrt meet their bounds.

Oracles: the per-head attention product (plaintext, float32 rounding: 1e-5), the same model
with every block computed in full (``Ops.as_middle_layer``: plaintext 1e-5; under SPU a second
secure run differs by truncation noise, 2e-2 on O(1) debug logits), exact 1/x and 1/sqrt(x) in
float64 over each function's domain.
"""

from __future__ import annotations

import numpy as np
import pytest
from puma.models import layers
from puma.protocols import lean

from puma import protocols, tasks
from puma.api import SecureModel
from puma.bench import functions as F
from puma.runtime.base import PlaintextSession

PROMPT = np.array([[5, 6, 7, 8, 9, 10, 11]], np.int32)
ENC_IDS = np.array([[2, 7, 9, 4, 1], [2, 8, 3, 0, 0]], np.int32)
SPU_ATOL = 2e-2


def _check(actual, expected, atol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.max(np.abs(actual - expected))
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


@pytest.mark.parametrize("shape", [(2, 5, 7, 6, 2, 8), (1, 1, 9, 4, 4, 16), (1, 6, 6, 8, 1, 4)])
def test_fused_heads_equal_per_head(shape):
    batch, length, keys, heads, kv_heads, dim = shape
    rng = np.random.default_rng(0)
    q = rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
    k = rng.normal(size=(batch, keys, kv_heads, dim)).astype(np.float32)
    v = rng.normal(size=(batch, keys, kv_heads, dim)).astype(np.float32)
    mask = rng.random((batch, 1, length, keys)) > 0.3
    mask[..., 0] = True
    exact = protocols.get("exact")
    fused = exact.with_plan(fused_heads=True)
    _check(layers.attend(q, k, v, mask, fused), layers.attend(q, k, v, mask, exact), 1e-5, f"fused {shape}")


def _last_logits(m: SecureModel) -> np.ndarray:
    mask = np.ones_like(PROMPT)
    secret = {"input_ids": tasks.client_ids(m.ops, PROMPT, m.model.config.vocab_size)}
    public = {"attention_mask": mask, "position_ids": tasks.positions_from_mask(mask)}
    return np.asarray(
        tasks.causal_step(m.session, m.model, m.ops, "forward", secret, public, reveal="logits", staged_run=m.staged)[
            "logits"
        ]
    )


def _encode(m: SecureModel, head: str) -> np.ndarray:
    mask = (ENC_IDS > 0).astype(np.int32)
    return np.asarray(m.encode_ids(ENC_IDS, head, attention_mask=mask).outputs)


def _outputs(preset: str, ops, **options) -> dict:
    with SecureModel.from_pretrained(preset, approx=ops, **options) as m:
        if m.model.causal:
            return {"logits": _last_logits(m), "tokens": m.generate_ids([PROMPT[0].tolist()], 3).tokens}
        return {head: _encode(m, head) for head in ("classify", "pooled")}


@pytest.mark.parametrize("preset", ["gpt2-debug", "llama-debug", "bert-debug-cls"])
@pytest.mark.parametrize("weights", ["resident", "streamed"])
def test_last_layer_rows_change_no_output(preset, weights):
    """Plaintext, one program and stage by stage: the last block computing only the rows the
    head reads gives the same last logits, greedy tokens (with the cache) and [CLS] outputs."""
    full = protocols.get("exact").with_plan(fused_heads=True)
    saving = full.with_plan(last_layer_rows=True)
    want, got = _outputs(preset, full, weights=weights), _outputs(preset, saving, weights=weights)
    for key, value in want.items():
        if key == "tokens":
            assert got[key] == value
        else:
            _check(got[key], value, 1e-5, f"{preset} {weights} {key}")


def test_lean_last_layer_saving_under_spu():
    """puma-lean on gpt2-debug under SPU: the same last logits as with every block in full, in
    one program and streamed, for fewer bytes."""
    lean_ops = protocols.get("puma-lean")
    costs = {}
    outs = {}
    for name, ops in (("saving", lean_ops), ("full", lean_ops.as_middle_layer())):
        for weights in ("resident", "streamed"):
            with SecureModel.from_pretrained("gpt2-debug", approx=ops, backend="sim", weights=weights) as m:
                with m.session.measure() as cost:
                    outs[name, weights] = _last_logits(m)
                costs[name, weights] = cost.total_bytes_sent
    for key, value in outs.items():
        if key != ("full", "resident"):  # the reference itself
            _check(value, outs["full", "resident"], SPU_ATOL, f"{key}")
    assert costs["saving", "resident"] < costs["full", "resident"]
    assert costs["saving", "streamed"] < costs["full", "streamed"]


def test_as_middle_layer_keeps_the_set_otherwise():
    lean_ops = protocols.get("puma-lean")
    middle = lean_ops.as_middle_layer()
    assert lean_ops.plan.last_layer_rows and not middle.plan.last_layer_rows
    assert middle.with_plan(last_layer_rows=True) == lean_ops
    assert protocols.get("puma-fast").as_middle_layer() is protocols.get("puma-fast")


def test_binned_reciprocal_and_rsqrt_meet_their_bounds():
    s = np.exp(np.linspace(np.log(lean.RECIPROCAL_LOW), np.log(128.0), 50001)).astype(np.float32)[:, None]
    rel = np.abs(np.asarray(lean.reciprocal(s, 128.0), np.float64) * s - 1.0).max()
    assert rel <= 1e-6, rel
    v = np.exp(np.linspace(np.log(lean.RSQRT_LOW), np.log(lean.RSQRT_HIGH), 50001)).astype(np.float32)[:, None]
    rel = np.abs(np.asarray(lean.rsqrt(v), np.float64) * np.sqrt(v.astype(np.float64)) - 1.0).max()
    assert rel <= 2e-5, rel


def test_lean_gelu_and_silu_are_no_worse_than_pumas_at_their_maximum():
    plain = PlaintextSession()
    plain.load_params({})
    cases = [c for c in F.accuracy_cases() if c.name in ("gelu", "silu")]
    ours, theirs = F.function_errors(plain, "puma-lean", cases), F.function_errors(plain, "puma", cases)
    for function in ("gelu", "silu"):
        assert ours[function]["max_abs"] < theirs[function]["max_abs"], function


def test_lean_gelu_and_silu_are_relu_beyond_their_cutoffs():
    x = np.array([-50.0, -2.7, 2.7, 50.0], np.float32)
    np.testing.assert_array_equal(np.asarray(lean.gelu(x)), np.maximum(x, 0))
    x = np.array([-50.0, -5.3, 5.3, 50.0], np.float32)
    np.testing.assert_array_equal(np.asarray(lean.silu(x)), np.maximum(x, 0))
