"""Client-server mode measured: the owner's party and the client's, cheetah between them.

Cells (each in one session; tokens checked against the same set's plaintext run):

- ``stories260K/nodes``: ``puma owner serve`` (a process holding the weights file) and a client
  with the manifest only: greedy ``--tokens`` (16) from "Once upon a time"; every step's cost.
- ``smollm2/sim`` and ``smollm2/nodes``: "The capital of France is" -> two tokens (" Paris" and
  the next), the prefill and the decode step: bytes, the busiest party's send actions, seconds,
  modelled LAN/WAN seconds, the ops that take the seconds. ``sim`` runs both parties as threads
  of one process (``--backend sim -c configs/client-server.yaml``: the same programs).
- ``gpt2/cheetah`` beside ``gpt2/aby3``: GPT-2 base shapes (random weights), 32 tokens in, one
  out, ``sim``: the two-party mode beside the three-party one, in one invocation.

Counting: send actions and bytes per party are SPU's link counters during program execution
(:mod:`puma.runtime.cost`); the busiest party's send actions bound the sequential messages.
SPU's cheetah options: its defaults (Ferret OT from yacl, the HE matrix product of BumbleBee),
plus the colocated optimization that ``mode: client-server`` turns on: the owner's party keeps
the weights as its private values, so a product of an activation by a weight is one homomorphic
product of a secret by the owner's matrix (two for secret by secret).
"""

from __future__ import annotations

import logging
import os
import tempfile

from puma import network
from puma.api import SecureModel
from puma.bench import data
from puma.bench.latency import NETWORKS, measure_generation
from puma.bench.load import LoadMonitor
from puma.bench.report import CellStore
from puma.errors import PumaError
from puma.runtime.local import client_server_topology, owner_serving

log = logging.getLogger(__name__)

APPROX = "puma-fast"
STORIES_PROMPT = "Once upon a time"
SMOLLM2_PROMPT = "The capital of France is"
GPT2_TOKENS = 32


def _plaintext(source: str, prompt: str, new: int) -> list[int]:
    return SecureModel.from_pretrained(source, approx=APPROX).generate([prompt], new).tokens[0]


def _generation(m: SecureModel, prompt: str, new: int) -> dict:
    with LoadMonitor(getattr(m.session.mesh, "pids", ())) as machine:
        figures, _ = measure_generation(m, prompt, [], new - 1)
    return {**figures, "load": machine.report()}


#: How long a party waits for the other's message in the served cells: SmolLM2's one-hot
#: embedding product keeps the owner's party computing for minutes between messages.
RECV_S = 900


def _served(source: str, prompt: str, new: int, ready_s: float) -> dict:
    """The owner serving ``source`` in its own process; one client's generation."""
    with tempfile.TemporaryDirectory(prefix="puma-cs-") as root:
        topo = client_server_topology(os.path.join(root, "cs.yaml"), recv_s=RECV_S)
        manifest = os.path.join(root, "manifest.json")
        with owner_serving(topo, source, manifest, root, ready_s):
            with SecureModel.from_pretrained(manifest, backend="nodes", config=topo, approx=APPROX) as m:
                return _generation(m, prompt, new)


def _simulated(source: str, prompt: str, new: int, config: str) -> dict:
    with SecureModel.from_pretrained(source, backend="sim", config=config, approx=APPROX) as m:
        return _generation(m, prompt, new)


def _checked(cell: dict, expected: list[int]) -> dict:
    return {**cell, "plaintext_tokens": expected, "equal_to_plaintext": cell["tokens"] == expected}


def _gpt2(protocol_config: str | None) -> dict:
    """GPT-2 base shapes, 32 tokens -> 1 (the prefill), in ``sim``."""
    ids = list(range(100, 100 + GPT2_TOKENS))
    connect = {"config": protocol_config} if protocol_config else {}
    with SecureModel.from_pretrained("gpt2", backend="sim", approx=APPROX, **connect) as m:
        with LoadMonitor(()) as machine:
            figures, _ = measure_generation(m, None, ids, 0)
    return {**figures, "load": machine.report()}


def run(
    out: str = "bench-results/client-server.json",
    tokens: int = 16,
    data_path: str | None = None,
    resume: bool | str = False,
    cells: tuple[str, ...] = ("stories260K/nodes", "smollm2/sim", "smollm2/nodes", "gpt2/cheetah", "gpt2/aby3"),
    config: str = "configs/client-server.yaml",
) -> dict:
    store = CellStore(
        out,
        {"approx": APPROX, "networks": {k: network.NAMED[k].describe() for k in NETWORKS}, "topology": config},
        resume=resume,
    )
    for cell in cells:
        if cell == "stories260K/nodes":
            folder = data.optional_data_dir(data_path, "stories260K")
            if folder is None:
                log.warning("stories260K.gguf not found: its cell is skipped")
                continue
            source = str(folder / "stories260K.gguf")
            store.measure(
                cell,
                lambda: _checked(
                    _served(source, STORIES_PROMPT, tokens, 120), _plaintext(source, STORIES_PROMPT, tokens)
                ),
            )
        elif cell == "smollm2/sim":
            store.measure(
                cell,
                lambda: _checked(
                    _simulated("smollm2", SMOLLM2_PROMPT, 2, config), _plaintext("smollm2", SMOLLM2_PROMPT, 2)
                ),
            )
        elif cell == "smollm2/nodes":
            store.measure(
                cell,
                lambda: _checked(_served("smollm2", SMOLLM2_PROMPT, 2, 1800), _plaintext("smollm2", SMOLLM2_PROMPT, 2)),
            )
        elif cell == "gpt2/cheetah":
            store.measure(cell, lambda: _gpt2(config))
        elif cell == "gpt2/aby3":
            store.measure(cell, lambda: _gpt2(None))
        else:
            raise PumaError(f"unknown cell {cell!r}")
    return store.data


def add_arguments(p) -> None:
    from puma import options

    p.add_argument("--tokens", type=options.positive, default=16, help="stories260K tokens (default: %(default)s)")
    p.add_argument(
        "--cells",
        nargs="+",
        default=["stories260K/nodes", "smollm2/sim", "smollm2/nodes", "gpt2/cheetah", "gpt2/aby3"],
        help="default: %(default)s",
    )
    p.add_argument("--topology", default="configs/client-server.yaml", help="for sim cells (default: %(default)s)")
    options.add_data_arg(p)


def main(args) -> dict:
    return run(args.out, args.tokens, args.data, args.resume, tuple(args.cells), args.topology)


def _step(step: dict) -> str:
    return (
        f"{step['bytes_sent'] / 1e6:.1f} MB | {step['max_party_send_actions']:.0f} | {step['wall_s']:.1f} | "
        f"{step['modelled_s']['lan-10g']:.1f} / {step['modelled_s']['wan']:.0f}"
    )


def markdown(result: dict) -> str:
    lines = [
        "Client-server mode (`puma-fast`, cheetah FM64/18, the weights private to the owner's party; the "
        "owner's party and the client's on this machine, `sim`: both in one process; `gpt2/aby3`: three "
        "parties, for comparison). Per step: bytes over all parties, the busiest party's send actions, "
        "seconds, modelled LAN/WAN seconds (1 ms, 10 Gbit/s / 40 ms, 400 Mbit/s).",
        "",
        "| cell | tokens = plaintext | step | bytes | busiest sends | s | LAN / WAN s "
        "| top ops by seconds (last step) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cell in result.get("cells", {}).items():
        equal = cell.get("equal_to_plaintext")
        shown = "-" if equal is None else ("yes" if equal else f"no ({cell['tokens']} vs {cell['plaintext_tokens']})")
        mark = " (contended)" if cell.get("load", {}).get("contended") else ""
        steps = [("prefill", cell["prefill"])] + (
            [("decode (mean)", cell["decode_mean"])] if cell.get("decode_mean") else []
        )
        for label, step in steps:
            top = cell["top_ops_last_decode"]["by_seconds"][:3]
            ops = ", ".join(f"{row['op'].removeprefix('pphlo.')} {row['seconds']:.1f}" for row in top)
            lines.append(f"| {name}{mark} | {shown} | {label} | {_step(step)} | {ops} |")
    return "\n".join(lines)
