"""Serving on ``nodes``: what a published model costs the first query, the next ones, and
clients that queue.

For each model: three parties on this machine (``puma node up`` on a fresh topology and
certificates), the owner publishes the model (seconds, bytes the owner sent), then one client
runs the same query twice (the first pays the parties' loading of their shares from their stores
and their compilation; the second neither), then ``clients`` clients start the same query at
once and queue at the first party (first come, first served): each one's wait in the queue and
its seconds to the answer. Tokens are checked equal to plaintext every time.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

from puma.api import SecureModel
from puma.bench.report import CellStore
from puma.runtime.local import LocalParties, write_topology

log = logging.getLogger(__name__)

#: name -> (source, approximation set, prompt ids, new tokens, what it stands for)
MODELS = {
    "stories260K": ("stories260K.gguf", "puma-fast", [1, 403, 407, 261, 378, 404, 328, 375], 8, "stories260K (LLaMA)"),
    "gpt2": ("gpt2", "puma-fast", list(range(100, 116)), 4, "GPT-2 base shapes (random weights)"),
}


def _query(manifest: str, topo: str, approx: str, ids: list[int], new: int) -> dict:
    """One client's query from opening its job to the answer, with the time it queued."""
    waited = {}
    logger = logging.getLogger("puma.progress")

    class Queue(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("queued at"):
                waited["queued"] = True

    handler = Queue()
    logger.addHandler(handler)
    start = time.perf_counter()
    try:
        with SecureModel.from_pretrained(manifest, backend="nodes", config=topo, approx=approx) as m:
            opened = time.perf_counter()
            result = m.generate_ids([ids], new)
    finally:
        logger.removeHandler(handler)
    done = time.perf_counter()
    return {
        "open_s": round(opened - start, 2),
        "run_s": round(done - opened, 2),
        "total_s": round(done - start, 2),
        "compile_s": round(result.cost.compile_s, 2),
        "queued": bool(waited.get("queued")),
        "tokens": result.tokens[0],
        "bytes_sent": result.cost.total_bytes_sent,
    }


def measure(name: str, folder, clients: int) -> dict:
    from puma import deploy

    source, approx, ids, new, what = MODELS[name]
    if name == "stories260K":
        source = str(folder / source)
    expected = SecureModel.from_pretrained(source, approx=approx).generate_ids([ids], new).tokens[0]
    with tempfile.TemporaryDirectory(prefix="puma-serving-") as root:
        topo = write_topology(os.path.join(root, "t.yaml"), connect_s=30, recv_s=60)
        with LocalParties(topo, os.path.join(root, "logs")):
            manifest = os.path.join(root, "manifest.json")
            published = deploy.publish_to(topo, source, manifest, sets=[approx])
            first = _query(manifest, topo, approx, ids, new)
            second = _query(manifest, topo, approx, ids, new)
            results: list[dict | None] = [None] * clients
            start = time.perf_counter()

            def client(i: int) -> None:
                time.sleep(0.2 * i)  # in order of arrival
                results[i] = _query(manifest, topo, approx, ids, new)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            queued_total = round(time.perf_counter() - start, 2)
    runs = [first, second, *results]
    return {
        "model": what,
        "approx": approx,
        "prompt_tokens": len(ids),
        "new_tokens": new,
        "publish_s": published["seconds"],
        "owner_sent_bytes": published["owner_sent_bytes"],
        "first": first,
        "second": second,
        "queued": results,
        "queued_total_s": queued_total,
        "tokens_match_plaintext": all(r["tokens"] == expected for r in runs),
    }


def run(
    models=tuple(MODELS), clients: int = 3, out: str = "bench-results/serving.json", data_path=None, resume: bool = True
) -> dict:
    from puma.bench import data

    folder = data.optional_data_dir(data_path, "stories260K")
    store = CellStore(out, {"backend": "nodes", "clients": clients}, resume=resume)
    for name in models:
        if name == "stories260K" and folder is None:
            continue
        store.measure(name, lambda: measure(name, folder, clients))
    return store.data


def add_arguments(p) -> None:
    from puma import options

    p.add_argument(
        "--models", nargs="+", default=["stories260K", "gpt2"], choices=list(MODELS), help="default: %(default)s"
    )
    p.add_argument("--clients", type=options.positive, default=3, help="clients queued at once (default: %(default)s)")
    options.add_data_arg(p)


def main(args) -> dict:
    return run(args.models, args.clients, args.out, args.data, resume=args.resume)


def markdown(result: dict) -> str:
    lines = [
        f"Serving a published model on nodes (three parties on this machine; {result['config']['clients']} "
        "clients queued at once after two queries of one client): seconds from opening the job to the answer",
        "",
        "| model | publish s (owner MB) | first query s (of which compile) | second query s | "
        "queued clients: s to answer | tokens = plaintext |",
        "|---|---|---|---|---|---|",
    ]
    for name, cell in result["cells"].items():
        first, second = cell["first"], cell["second"]
        queued = ", ".join(f"{q['total_s']:.1f}" for q in cell["queued"])
        lines.append(
            f"| {name} | {cell['publish_s']:.1f} ({cell['owner_sent_bytes'] / 1e6:.1f}) | "
            f"{first['total_s']:.1f} ({first['compile_s']:.1f}) | {second['total_s']:.1f} | {queued} | "
            f"{'yes' if cell['tokens_match_plaintext'] else 'NO'} |"
        )
    return "\n".join(lines)
