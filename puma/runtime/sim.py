"""The ``sim`` backend: every computing party is a thread of this process, linked by SPU's
in-memory channels, and every party is profiled (SPU's own ``Simulator`` profiles rank 0 only).

All threads share the process's SPU log, and SPU prints a party's profile block when that
party's run ends, which is the same instant for every party. So that blocks do not interleave,
party r's copy of each program ends with a public-only marker op (``pphlo.atan2`` on
``r * STAGGER_ELEMENTS`` constants: no communication, a few milliseconds per rank) that delays
its block until party r-1's is written. The marker is removed from the reported op costs and
from the party's seconds; the parser checks every block (its op lines must add up to its link
totals), and a run whose blocks still mixed is reported as unprofiled rather than guessed.
"""

from __future__ import annotations

import logging
import threading

import spu.libspu as libspu

from puma.errors import PumaError
from puma.runtime.cost import RunProfile, parse_profiles
from puma.runtime.party import ComputeParty, ProcessLog, rank_of
from puma.runtime.roles import PartyShares
from puma.runtime.secure import Mesh

log = logging.getLogger(__name__)

STAGGER_ELEMENTS = 16384
MARKER_OP = "pphlo.atan2"


def staggered(code: bytes, rank: int) -> bytes:
    """``code`` with a public ``atan2`` over ``rank * STAGGER_ELEMENTS`` values before its return."""
    if rank == 0:
        return code
    text = code.decode()
    ty = f"tensor<{rank}x{STAGGER_ELEMENTS}xf32>"
    marker = (
        f"    %puma_stagger_in = pphlo.constant dense<5.000000e-01> : {ty}\n"
        f"    %puma_stagger_out = {MARKER_OP} %puma_stagger_in, %puma_stagger_in : {ty}\n"
        f"    pphlo.free %puma_stagger_in : {ty}\n"
        f"    pphlo.free %puma_stagger_out : {ty}\n"
    )
    at = text.rindex("\n    return ") + 1
    return (text[:at] + marker + text[at:]).encode()


class _Worker(threading.Thread):
    """Runs one call in a thread and keeps its result or exception."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except BaseException as err:  # handed to the caller
            self.error = err


def _all(fns_args) -> list:
    """Run one call per party concurrently and wait for all of them.

    No overall deadline: a run may take as long as it needs, and a party that stops answering
    makes its peers fail after the link's receive timeout.
    """
    workers = [_Worker(fn, *args) for fn, args in fns_args]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for rank, w in enumerate(workers):
        if w.error is not None:
            raise PumaError(
                f"sim: party {rank} failed: {str(w.error).splitlines()[0] if str(w.error) else w.error!r}"
            ) from w.error
    return [w.result for w in workers]


class SimMesh(Mesh):
    """All parties as threads over in-memory links, each profiled."""

    backend = "sim"

    def __init__(self, world_size: int, config: libspu.RuntimeConfig, recv_timeout_s: float = 60.0):
        self.world_size = world_size
        self.log = ProcessLog.get()
        desc = libspu.link.Desc()
        desc.recv_timeout_ms = int(recv_timeout_s * 1000)
        for rank in range(world_size):
            desc.add_party(f"party{rank}", f"thread-{rank}")

        def make(rank):
            return ComputeParty(rank, libspu.link.create_mem(desc, rank), config)

        self.parties: list[ComputeParty] = _all([(make, (r,)) for r in range(world_size)])

    def deliver(self, bundles: list[PartyShares]) -> None:
        for party, bundle in zip(self.parties, bundles):
            party.receive(bundle)

    def install(self, key: str, name: str, code: bytes) -> None:
        for party in self.parties:
            party.install(key, name, staggered(code, party.rank))

    def run(self, key: str, inputs: list[str], outputs: list[str]) -> list[RunProfile | None]:
        start = self.log.mark()
        seconds = _all([(p.run, (key, inputs, outputs)) for p in self.parties])
        try:
            blocks = parse_profiles(self.log.read_from(start))
        except ValueError as err:
            log.warning("sim: run %s not profiled per party (%s)", key, err)
            return [None] * self.world_size
        profiles: list[RunProfile | None] = [None] * self.world_size
        for block in blocks:
            rank = rank_of(block.name)
            marker = block.ops.pop(MARKER_OP, None) if rank else None
            block.link.rank = rank
            block.link.seconds = seconds[rank] - (marker.seconds if marker else 0.0)
            profiles[rank] = block
        return profiles

    def collect(self, names: list[str]) -> list[PartyShares]:
        return [p.send(names) for p in self.parties]

    def drop(self, names: list[str]) -> None:
        for p in self.parties:
            p.drop(names)

    def close(self) -> None:
        self.parties = []
