"""Accuracy and cost of each approximation set's functions, one function at a time.

``function_errors`` compares a set's functions with the exact ones on the input domains a
Transformer sees (GeLU/SiLU on [-10, 10], softmax rows of 128 scores in [-20, 20] with masks,
LayerNorm/RMSNorm rows of 768, the embedding of random ids, argmax of rows with many ties), in
plaintext or under a secure backend. ``function_costs`` measures bytes and send actions of each
function at BERT-base shapes (argmax: one decode step's GPT-2 logits) under SPU. Both feed
``scripts/bench_protocols.py`` and the protocol tests.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from puma import protocols
from puma.bench.report import profiled
from puma.program import Program
from puma.protocols import exact
from puma.runtime.base import PlaintextSession, Session
from puma.tasks import client_ids


@dataclasses.dataclass(frozen=True)
class Case:
    """One function on one input batch: ``call(ops, secret, public)``.

    ``prepare(ops, secret)`` adapts the client's inputs to the set (one-hot ids for sets with
    ``client_onehot``).
    """

    name: str
    call: Callable
    secret: dict
    public: dict
    prepare: Callable | None = None


def _onehot_ids(ops, secret):
    return {**secret, "ids": client_ids(ops, secret["ids"], secret["table"].shape[0])}


def _softmax_inputs(rows: int, width: int, seed: int):
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-20.0, 20.0, (rows, width)).astype(np.float32)
    mask = (rng.random((rows, width)) > 0.3).astype(np.int32)
    mask[:, 0] = 1
    mask[: rows // 2] = 1  # half the rows unmasked, half with padding-like masks
    return scores, mask


def accuracy_cases(points: int = 20001, rows: int = 64, seed: int = 0) -> list[Case]:
    """Inputs on each function's domain; ``points`` grid points, ``rows`` rows for row functions."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-10.0, 10.0, points, dtype=np.float32)
    scores, mask = _softmax_inputs(rows, 128, seed)
    x768 = (rng.standard_normal((rows, 768)) * rng.uniform(0.2, 5.0, (rows, 1)) + rng.uniform(-2, 2, (rows, 1))).astype(
        np.float32
    )
    weight = rng.uniform(0.5, 1.5, 768).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, 768).astype(np.float32)
    table = rng.standard_normal((1000, 16)).astype(np.float32)
    ids = rng.integers(0, 1000, (rows,)).astype(np.int32)
    logits = rng.integers(-40, 40, (rows, 1001)).astype(np.float32) / 4  # many exact ties; odd width
    return [
        Case("gelu", lambda o, s, p: o.gelu(s["x"]), {"x": grid}, {}),
        Case("silu", lambda o, s, p: o.silu(s["x"]), {"x": grid}, {}),
        Case("softmax", lambda o, s, p: o.softmax(s["x"], p["mask"].astype(bool)), {"x": scores}, {"mask": mask}),
        Case(
            "layer_norm",
            lambda o, s, p: o.layer_norm(s["x"], s["w"], s["b"], 1e-12),
            {"x": x768, "w": weight, "b": bias},
            {},
        ),
        Case("rms_norm", lambda o, s, p: o.rms_norm(s["x"], s["w"], 1e-6), {"x": x768, "w": weight}, {}),
        Case("embed", lambda o, s, p: o.embed(s["ids"], s["table"]), {"ids": ids, "table": table}, {}, _onehot_ids),
        Case("argmax", lambda o, s, p: o.argmax(s["x"]), {"x": logits}, {}),
    ]


def cost_cases(seed: int = 0) -> list[Case]:
    """Functions at BERT-base shapes (one layer, 128 tokens); argmax over one GPT-2 vocabulary row."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-8.0, 8.0, (12, 128, 128)).astype(np.float32)
    return [
        Case("gelu", lambda o, s, p: o.gelu(s["x"]), {"x": rng.uniform(-6, 6, (128, 3072)).astype(np.float32)}, {}),
        Case(
            "softmax",
            lambda o, s, p: o.softmax(s["x"], p["mask"].astype(bool)),
            {"x": scores},
            {"mask": np.ones((12, 128, 128), np.int32)},
        ),
        Case(
            "layer_norm",
            lambda o, s, p: o.layer_norm(s["x"], s["w"], s["b"], 1e-12),
            {
                "x": rng.standard_normal((128, 768)).astype(np.float32),
                "w": np.ones(768, np.float32),
                "b": np.zeros(768, np.float32),
            },
            {},
        ),
        Case(
            "embed",
            lambda o, s, p: o.embed(s["ids"], s["table"]),
            {
                "ids": rng.integers(0, 30522, (128,)).astype(np.int32),
                "table": (rng.standard_normal((30522, 768)) * 0.02).astype(np.float32),
            },
            {},
            _onehot_ids,
        ),
        Case("argmax", lambda o, s, p: o.argmax(s["x"]), {"x": rng.normal(0, 3, (1, 50257)).astype(np.float32)}, {}),
    ]


def run_case(session: Session, ops, case: Case) -> np.ndarray:
    program = Program(f"fn_{case.name}", lambda p, st, sec, pub: ({"y": case.call(ops, sec, pub)}, {}), key=(ops.name,))
    secret = case.prepare(ops, case.secret) if case.prepare else case.secret
    return np.asarray(session.run(program, secret, case.public)["y"])


def reference(case: Case) -> np.ndarray:
    session = PlaintextSession()
    session.load_params({})
    return run_case(session, exact.OPS, case)


def function_errors(session: Session, set_name: str, cases: list[Case]) -> dict:
    """{function: {"max_abs": ..., "mean_abs": ...}} of ``set_name`` vs exact on ``cases``."""
    ops = protocols.get(set_name)
    out = {}
    for case in cases:
        diff = np.abs(run_case(session, ops, case).astype(np.float64) - reference(case).astype(np.float64))
        out[case.name] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
    return out


def function_costs(session: Session, set_name: str, cases: list[Case]) -> dict:
    """{function: {"bytes_sent", "send_actions", "seconds"}} summed over parties, one run each."""
    ops = protocols.get(set_name)
    out = {}
    for case in cases:
        run_case(session, ops, case)  # compile first: the measured run is the second one
        with session.measure() as cost:
            run_case(session, ops, case)
        profiled(cost)
        out[case.name] = {
            "bytes_sent": cost.total_bytes_sent,
            "send_actions": cost.total_send_actions,
            "seconds": round(cost.wall_s, 4),
        }
    return out
