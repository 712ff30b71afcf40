"""Wall time under a named network, modelled from a measured run.

    time(network) = compute_s + rounds * RTT + (busiest_bytes + client_bytes) * 8 / bandwidth

``compute_s`` is the run's wall time on this machine with the parties on in-memory links or
loopback (weight streaming excluded), so it already contains the local cost of every message;
``rounds`` are the send actions of the busiest party (each waits for its peer's reply, so it is
an upper bound on the critical path's round trips: sends that overlap are counted separately);
``busiest_bytes`` are the bytes sent by the party that sent most (the parties send at once over
their own links, so the busiest one bounds the transfer). Assumptions: links are full-duplex and
independent per pair, bandwidth is the per-link rate, latency does not overlap with compute.
Streamed weights are left out (``compute_s`` excludes the owner's streaming, which a share store
removes). ``client_bytes`` are the client's input shares and the output shares it receives
(``io_bytes``), over one link of the same bandwidth: small for token ids, but a client that
one-hot encodes its tokens uploads tokens x vocabulary shares (``puma-fast``).
The ``nodes`` backend with each party in its own network namespace and ``tc tbf`` rate limits
checks the bandwidth term (``netem`` delay is not available on these machines, so the latency
term is not measured here).
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Network:
    name: str
    bandwidth_bps: float  # bits per second per link
    rtt_s: float  # round-trip time

    def describe(self) -> str:
        return f"{self.name} ({_rate(self.bandwidth_bps)}, {self.rtt_s * 1e3:g} ms RTT)"


#: PUMA's LAN (5 Gbps, 1 ms), Ditto's LAN latency (0.4 ms) and a WAN (400 Mbps, 40 ms).
NETWORKS = {
    "lan": Network("LAN", 5e9, 1e-3),
    "lan-0.4ms": Network("LAN", 5e9, 0.4e-3),
    "wan": Network("WAN", 400e6, 40e-3),
}
#: Every network known by name: :data:`NETWORKS` (the columns of the cost, peer and embedding
#: tables) and issue 29's LAN (10 Gbps, 1 ms), which the latency benchmark models.
NAMED = {**NETWORKS, "lan-10g": Network("LAN", 10e9, 1e-3)}

_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def _rate(bps: float) -> str:
    for unit, size in (("Gbps", 1e9), ("Mbps", 1e6), ("kbps", 1e3)):
        if bps >= size:
            return f"{bps / size:g} {unit}"
    return f"{bps:g} bps"


def parse(text: str) -> Network:
    """A network by name (``lan``, ``lan-0.4ms``, ``lan-10g``, ``wan``: :data:`NAMED`) or as
    ``BANDWIDTH,RTT``: ``1G,10ms``, ``400M,40ms`` (bits per second; RTT in ms, or s with an ``s``
    suffix)."""
    key = text.strip().lower()
    if key in NAMED:
        return NAMED[key]
    match = re.fullmatch(r"([\d.]+)\s*([kmg]?)(?:bps|b)?\s*,\s*([\d.]+)\s*(ms|s)?", key)
    if not match:
        raise ValueError(f"{text!r} is not a network: use lan, wan or BANDWIDTH,RTT such as 1G,10ms")
    bandwidth = float(match.group(1)) * _UNITS[match.group(2)]
    rtt = float(match.group(3)) * (1.0 if match.group(4) == "s" else 1e-3)
    if bandwidth <= 0:
        raise ValueError(f"{text!r}: the bandwidth must be positive")
    return Network("custom", bandwidth, rtt)


def estimate(compute_s: float, rounds: int, busiest_bytes: float, network: Network) -> float:
    """Modelled seconds of a run (see the module doc)."""
    return compute_s + rounds * network.rtt_s + busiest_bytes * 8.0 / network.bandwidth_bps


def busiest_bytes(cell: dict) -> float:
    """Bytes sent by the busiest party of a cost cell: measured per party in a whole run; in a
    composed cell the layer part's busiest share of its total, applied to the composed total."""
    per_party = cell.get("per_party") or cell.get("layer", {}).get("per_party")
    if not per_party:
        return cell["bytes_sent"] / 3.0
    sent = [p["bytes_sent"] for p in per_party]
    share = max(sent) / max(sum(sent), 1)
    return cell["bytes_sent"] * share if "per_party" not in cell else max(sent)


def client_bytes(cell: dict) -> float:
    """The client's upload and download of a cost cell (0 where it was not recorded)."""
    if "client_upload_bytes" in cell:
        return cell["client_upload_bytes"] + cell.get("client_download_bytes", 0)
    return cell.get("io_bytes", 0)


def cell_times(cell: dict, networks: dict[str, Network]) -> dict[str, float]:
    """Modelled seconds of a cost cell under each network."""
    compute = cell.get("compute_s", cell["run_s"])
    rounds = cell["max_party_send_actions"]
    moved = busiest_bytes(cell) + client_bytes(cell)
    return {key: estimate(compute, rounds, moved, net) for key, net in networks.items()}
