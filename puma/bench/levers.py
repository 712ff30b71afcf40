"""Communication levers, one at a time: bytes and send actions before and after, kept or not.

Each :class:`Lever` runs a baseline and a candidate function on the same secret input, at the
shape where the lever matters in a model (one BERT-base layer at 128 tokens, one LLaMA-7B
layer at 8 tokens), under SPU ABY3 FM64/18 on ``sim``. The JSON records both runs' totals and
their per-op split, so a lever that was tried and dropped stays on record with its numbers.

Counting: bytes and send actions are summed over the three parties for one run of the
function after a warm-up run (``Session.measure``); the per-op split comes from SPU's pphlo
profile.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax.numpy as jnp
import numpy as np

from puma.bench.report import CellStore, profiled
from puma.models import layers
from puma.program import Program
from puma.protocols import exact, fast, lean
from puma.runtime import open_session

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Lever:
    """``before`` and ``after`` on ``inputs`` (name -> shape); ``kept`` says which set uses it."""

    name: str
    where: str
    inputs: dict
    before: Callable
    after: Callable
    kept: str
    note: str


def _attention(fused: bool) -> Callable:
    ops = dataclasses.replace(exact.OPS, name="attention-only", softmax=lambda x, where=None: x).with_plan(
        fused_heads=fused
    )
    return lambda s: layers.attend(s["q"], s["k"], s["v"], jnp.ones((1, 1) + s["q"].shape[1:2] * 2, bool), ops)


def _packed_sign_bits(x):
    """Two comparisons' bits from one boolean conversion of a packed integer (tried, dropped)."""
    z = (x * 1024.0).astype(jnp.int32)
    return (z >> 30) & 1


LEVERS = (
    Lever(
        "gelu-relu-minus-cubic",
        "BERT-base layer: GeLU on 128 x 3072",
        {"x": (128, 3072)},
        fast.gelu,
        lean.gelu,
        "puma-lean",
        "relu(x) - p3(|x|): |x| comes free from relu, Horner in |x| needs no x^2",
    ),
    Lever(
        "silu-relu-minus-cubic",
        "LLaMA-7B layer: SiLU on 8 x 11008",
        {"x": (8, 11008)},
        fast.silu,
        lean.silu,
        "puma-lean",
        "degree 3 in |x| instead of degree 6 in x^2",
    ),
    Lever(
        "silu-relu-minus-quadratic",
        "LLaMA-7B layer: SiLU on 8 x 11008",
        {"x": (8, 11008)},
        lean.silu,
        lambda x: lean._relu_minus_poly(x, 4.2192, (0.06115806205395034, 0.19864011428882372, -0.050517146499636185)),
        "none",
        "max error 6.1e-2 (PUMA's 7.2e-2): saves one multiplication per element, dropped for accuracy",
    ),
    Lever(
        "reciprocal-binned-newton",
        "BERT-base layer: softmax denominators, 12 x 128 rows",
        {"x": (1536, 1)},
        lambda x: jnp.reciprocal(1.0 + jnp.abs(x) * 10.0),
        lambda x: lean.reciprocal(1.0 + jnp.abs(x) * 10.0, 128.0),
        "puma-lean",
        "one batched comparison against 31 bin edges, a third-order step and a Newton step, against SPU's reciprocal",
    ),
    Lever(
        "rsqrt-binned-newton",
        "BERT-base layer: LayerNorm variances, 128 rows",
        {"x": (128, 1)},
        lambda x: fast._rsqrt_refined(1.0 + jnp.abs(x)),
        lambda x: lean.rsqrt(1.0 + jnp.abs(x)),
        "puma-lean",
        "against puma-fast's SPU rsqrt plus a Newton step: 136 bin edges in one comparison, two Newton steps",
    ),
    Lever(
        "fused-heads-attention",
        "BERT-base layer: scores and outputs of 12 heads at 128 tokens",
        {"q": (1, 128, 12, 64), "k": (1, 128, 12, 64), "v": (1, 128, 12, 64)},
        _attention(False),
        _attention(True),
        "puma-lean",
        "one product each way against block-diagonal keys and values instead of one per head",
    ),
    Lever(
        "fused-heads-attention-llama",
        "LLaMA-7B layer: 32 heads at 8 tokens",
        {"q": (1, 8, 32, 128), "k": (1, 8, 32, 128), "v": (1, 8, 32, 128)},
        _attention(False),
        _attention(True),
        "puma-lean",
        "as above, 32 heads",
    ),
    Lever(
        "packed-comparisons",
        "two comparisons on 100000 values",
        {"x": (100000,)},
        lambda x: jnp.concatenate([x, x - 1.0]) > 0,
        _packed_sign_bits,
        "none",
        "one arithmetic-to-boolean conversion of a packed integer for two sign bits: SPU's full "
        "conversion costs 3x a comparison, so it loses",
    ),
)


def _measure(session, name: str, fn: Callable, inputs: dict) -> dict:
    program = Program(f"lever_{name}", lambda p, st, sec, pub: ({"y": fn(sec)}, {}), key=(name,))
    session.run(program, inputs, {})  # compile first: the measured run is the second one
    with session.measure() as cost:
        session.run(program, inputs, {})
    profiled(cost)
    return {
        "bytes_sent": cost.total_bytes_sent,
        "send_actions": cost.total_send_actions,
        "per_op": {
            k: {"bytes_sent": v.bytes_sent, "send_actions": v.send_actions}
            for k, v in cost.per_op.items()
            if v.bytes_sent or v.send_actions
        },
    }


def _call(fn: Callable, single: bool) -> Callable:
    return (lambda s: fn(s["x"])) if single else fn


def run(out: str = "bench-results/levers.json", resume: bool = True) -> dict:
    """Measure every lever (resumable: measured levers are kept)."""
    store = CellStore(out, {"backend": "sim", "protocol": "aby3/FM64/18"}, resume=resume)
    rng = np.random.default_rng(0)
    with open_session("sim") as session:
        session.load_params({})
        for lever in LEVERS:
            if store.holds(lever.name):
                continue
            log.info("lever %s", lever.name)
            inputs = {k: rng.uniform(-6, 6, shape).astype(np.float32) for k, shape in lever.inputs.items()}
            single = list(lever.inputs) == ["x"]
            before = _measure(session, f"{lever.name}_before", _call(lever.before, single), inputs)
            after = _measure(session, f"{lever.name}_after", _call(lever.after, single), inputs)
            store.put(
                lever.name,
                {
                    "where": lever.where,
                    "kept": lever.kept,
                    "note": lever.note,
                    "before": before,
                    "after": after,
                    "bytes_ratio": round(after["bytes_sent"] / before["bytes_sent"], 3),
                    "send_actions_ratio": round(after["send_actions"] / before["send_actions"], 3),
                },
            )
    return store.data


def add_arguments(p) -> None:
    """No options of its own."""


def main(args) -> dict:
    return run(args.out, resume=args.resume)


def markdown(result: dict) -> str:
    lines = [
        "Levers one at a time (sim, ABY3/FM64/18; bytes and send actions summed over the three parties, "
        "one run after a warm-up):",
        "",
        "| lever | where | before MB / sends | after MB / sends | bytes ratio | sends ratio | kept in | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in result["cells"].items():
        b, a = c["before"], c["after"]
        lines.append(
            f"| {name} | {c['where']} | {b['bytes_sent'] / 1e6:.2f} / {b['send_actions']} | "
            f"{a['bytes_sent'] / 1e6:.2f} / {a['send_actions']} | {c['bytes_ratio']:.2f} | "
            f"{c['send_actions_ratio']:.2f} | {c['kept']} | {c['note']} |"
        )
    return "\n".join(lines)
