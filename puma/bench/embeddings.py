"""The three secure embeddings measured, fitted, and compared under named networks.

Each embedding of :mod:`puma.protocols.embeddings` runs alone (secret ids or client-made one-hot
rows, a secret table, the rows revealed and checked against ``table[ids]``) at a grid of small
shapes and at the embedding shapes of GPT-2 (32 tokens), BERT-base (128) and LLaMA-7B (8). The
grid fixes the cost model's traffic coefficients (non-negative least squares; exact there), all
shapes its compute coefficients; the model's error is reported at the model shapes, and every
embedding's time there is modelled under each network from its measured costs. ABY3, FM64, 18
fraction bits, ``sim``; cells record the machine's load.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

from puma import network
from puma.bench.load import LoadMonitor
from puma.bench.report import CellStore, profiled
from puma.errors import PumaError
from puma.program import Program
from puma.protocols import embeddings as E

log = logging.getLogger(__name__)

#: (tokens, vocabulary, width) the coefficients are fitted to.
FIT_SHAPES = ((8, 2048, 256), (32, 2048, 256), (8, 8192, 256), (8, 2048, 768), (32, 8192, 768), (16, 4096, 512))
#: The embedding shapes of the models in the cost tables.
MODEL_SHAPES = {"gpt2": (32, 50257, 768), "bert-base": (128, 30522, 768), "llama-7b": (8, 32000, 4096)}
FIELDS = ("bytes_sent", "rounds", "compute_s", "client_upload")


def measure(session, kind: str, tokens: int, vocab: int, dim: int) -> dict:
    """One run of ``kind`` on a fresh random table: its costs (rows checked exactly)."""
    from puma import protocols

    ops = E.with_embedding(protocols.get("exact"), kind)
    rng = np.random.default_rng(0)
    table = rng.normal(0, 1, (vocab, dim)).astype(np.float32)
    ids = rng.integers(0, vocab, (1, tokens)).astype(np.int32)
    x = (ids[..., None] == np.arange(vocab)).astype(np.float32) if ops.plan.client_onehot else ids
    session.load_params({"table": table})

    def fn(params, state, secret, public):
        return {"rows": ops.embed(secret["x"], params["table"])}, {}

    with LoadMonitor() as machine, session.measure() as cost:
        out = session.run(Program(f"embed_{kind}", fn, key=(kind,)), {"x": x}, {})
    error = float(np.abs(out["rows"] - table[ids]).max())
    if error > 1e-4:
        raise PumaError(f"the {kind} embedding is wrong under SPU: max |error| {error:.3g}")
    report = profiled(cost).to_dict()
    sent = [p["bytes_sent"] for p in report["per_party"]]
    return {
        "bytes_sent": report["total_bytes_sent"],
        "busiest_bytes": max(sent),
        "rounds": max(p["send_actions"] for p in report["per_party"]),
        "compute_s": round(report["wall_s"], 3),
        "client_upload": report["client_upload_bytes"],
        "max_abs_error": error,
        "load": machine.report(),
    }


def fit(cells: dict[tuple, dict]) -> dict[str, list[float]]:
    """Non-negative least-squares coefficients (T*V, T*D, T, 1, T*V*D) of every field from
    ``{(T, V, D): cell}`` (a cost has no negative part); the T*V*D term (local matrix-product
    work) only for compute seconds. Each column is scaled to unit norm for the solve."""
    from scipy.optimize import nnls

    shapes = list(cells)
    out = {}
    for field in FIELDS:
        columns = np.array(
            [[t * v, t * d, t, 1.0] + ([t * v * d] if field == "compute_s" else []) for t, v, d in shapes], dtype=float
        )
        scale = np.linalg.norm(columns, axis=0)
        y = np.array([cells[s][field] for s in shapes], dtype=float)
        coef = nnls(columns / scale, y)[0] / scale
        out[field] = [float(f"{c:.4g}") for c in coef] + ([] if field == "compute_s" else [0.0])
    return out


def _key(kind: str, shape: tuple) -> str:
    return f"{kind}/{shape[0]}x{shape[1]}x{shape[2]}"


def run(out: str = "bench-results/embeddings.json", resume: bool = True, models: bool = True) -> dict:
    """Measure every embedding at the fit grid (and the model shapes), fit, model the networks."""
    from puma.runtime import open_session

    store = CellStore(out, {"backend": "sim", "protocol": "aby3/FM64/18"}, resume=resume)
    shapes = list(FIT_SHAPES) + (list(MODEL_SHAPES.values()) if models else [])
    todo = [(kind, s) for s in shapes for kind in E.KINDS if not store.holds(_key(kind, s))]
    with open_session("sim") as session:
        for kind, shape in tqdm(todo, desc="embeddings", unit="run"):
            store.put(_key(kind, shape), measure(session, kind, *shape))
    fits = {}
    for kind in E.KINDS:  # traffic from the grid (exact there); compute also from the large shapes
        traffic = fit({s: store.cells[_key(kind, s)] for s in FIT_SHAPES})
        compute = fit({s: store.cells[_key(kind, s)] for s in shapes})
        fits[kind] = {**traffic, "compute_s": compute["compute_s"]}
    rows = {}
    for name, shape in MODEL_SHAPES.items():
        if _key(E.KINDS[0], shape) not in store.cells:
            continue
        row = {}
        for kind in E.KINDS:
            cell = store.cells[_key(kind, shape)]
            model = E.EmbeddingCost(*(E.Linear(*fits[kind][f]) for f in FIELDS))
            predicted = {
                "bytes_sent": model.bytes_sent(*shape),
                "rounds": model.rounds(*shape),
                "client_upload": model.client_upload(*shape),
                "compute_s": model.compute_s(*shape),
            }
            row[kind] = {
                "measured": {k: cell[k] for k in (*FIELDS, "busiest_bytes")},
                "fit_error": {k: predicted[k] / cell[k] - 1.0 if cell[k] else 0.0 for k in predicted},
                "seconds": {
                    key: network.estimate(
                        cell["compute_s"], cell["rounds"], cell["busiest_bytes"] + cell["client_upload"], net
                    )
                    for key, net in network.NETWORKS.items()
                },
            }
        rows[name] = {"shape": list(shape), "kinds": row, "cheapest": _cheapest(row)}
    store.data["results"] = {"fits": fits, "models": rows}
    store.save()
    return store.data


def _cheapest(row: dict) -> dict:
    return {key: min(row, key=lambda kind: row[kind]["seconds"][key]) for key in network.NETWORKS}


def add_arguments(p) -> None:
    p.add_argument(
        "--no-models",
        action="store_true",
        help="only the small shapes the cost model is fitted to (default: the models' shapes too)",
    )


def main(args) -> dict:
    return run(args.out, resume=args.resume, models=not args.no_models)


def markdown(result: dict) -> str:
    res = result.get("results", {})
    nets = network.NETWORKS
    lines = [
        "The three secure embeddings alone at the models' embedding shapes (sim, ABY3/FM64/18): bytes sent by all "
        "parties, the client's upload, send actions of the busiest party, seconds here, and the time modelled "
        "under each network from these measurements (compute + rounds x RTT + busiest party's bytes / bandwidth "
        "+ client upload / bandwidth).",
        "",
        "| model (tokens x vocabulary x width) | embedding | MB | client upload MB | send actions (max party) | "
        "seconds | " + " | ".join(f"{n.describe()} s" for n in nets.values()) + " | cost model error: bytes, "
        "rounds, seconds |",
        "|---|---|---|---|---|---|" + "---|" * len(nets) + "---|",
    ]
    for name, row in res.get("models", {}).items():
        t, v, d = row["shape"]
        for kind, cell in row["kinds"].items():
            m = cell["measured"]
            times = " | ".join(
                f"**{cell['seconds'][k]:.1f}**" if row["cheapest"][k] == kind else f"{cell['seconds'][k]:.1f}"
                for k in nets
            )
            fit_error = ", ".join(f"{100 * cell['fit_error'][k]:+.0f}%" for k in ("bytes_sent", "rounds", "compute_s"))
            lines.append(
                f"| {name} ({t} x {v} x {d}) | {kind} | {m['bytes_sent'] / 1e6:.1f} | {m['client_upload'] / 1e6:.1f} | "
                f"{m['rounds']} | {m['compute_s']:.1f} | {times} | {fit_error} |"
            )
    lines += [
        "",
        "Bold: the cheapest embedding on that network. Cost-model coefficients (T*V, T*D, T, 1, T*V*D): "
        "bytes, rounds and upload fitted to the small grid, compute seconds to every measured shape; their "
        "error at these shapes is above (SPU splits large products, which the linear model does not follow):",
        "",
    ]
    for kind, fits in res.get("fits", {}).items():
        lines.append(f"- {kind}: " + "; ".join(f"{k} {[float(f'{c:.4g}') for c in v]}" for k, v in fits.items()))
    return "\n".join(lines)
