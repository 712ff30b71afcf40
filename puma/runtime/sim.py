"""The ``sim`` backend: every computing party is a thread of this process, linked by SPU's
in-memory channels, and every party is profiled (SPU's own ``Simulator`` profiles rank 0 only).

All threads share the process's SPU log, and SPU prints a party's profile block when that
party's run ends, which is the same instant for every party. Party r's copy of each program
therefore ends with r public-only marker ops (``pphlo.atan2`` on ``STAGGER_ELEMENTS``
constants: no communication, a few milliseconds each). They usually delay its block until party
r-1's is written, and whatever the timing they name the party inside its block: the parser
untangles interleaved blocks by their link totals and accepts only the assignment in which the
block named ``@r<r>`` ran r markers (:func:`puma.runtime.profiles.parse_profiles`). The markers are
removed from the reported op costs and from the party's seconds; a run whose blocks still cannot
be told apart is reported as unprofiled rather than guessed.
"""

from __future__ import annotations

import logging
import os

import spu.libspu as libspu

from puma.runtime import messages
from puma.runtime.commands import CLIENT, COMMANDS, OPERATOR, OWNER, PartyService
from puma.runtime.config import RECV_TIMEOUT_S
from puma.runtime.fanout import fan_out, first_line
from puma.runtime.party import ComputeParty, ProcessLog, rank_of
from puma.runtime.profiles import RunProfile, parse_profiles
from puma.runtime.secure import Mesh

#: The driver of a sim session holds every role: one process, one trust domain.
ROLES = frozenset({OPERATOR, OWNER, CLIENT})

log = logging.getLogger(__name__)

STAGGER_ELEMENTS = 65536
MARKER_OP = "pphlo.atan2"


def staggered(code: bytes, rank: int) -> bytes:
    """``code`` with ``rank`` public ``atan2`` ops over ``STAGGER_ELEMENTS`` values each before its
    return: they delay party r's profile block, and their count names the party in it."""
    text = code.decode()
    ty = f"tensor<{STAGGER_ELEMENTS}xf32>"
    marker = "".join(
        f"    %puma_stagger_in{i} = pphlo.constant dense<5.000000e-01> : {ty}\n"
        f"    %puma_stagger_out{i} = {MARKER_OP} %puma_stagger_in{i}, %puma_stagger_in{i} : {ty}\n"
        f"    pphlo.free %puma_stagger_in{i} : {ty}\n"
        f"    pphlo.free %puma_stagger_out{i} : {ty}\n"
        for i in range(rank)
    )
    at = text.rindex("\n    return ") + 1
    return (text[:at] + marker + text[at:]).encode()


def names_its_party(block: RunProfile) -> bool:
    """Whether ``block`` ran as many markers as the rank its name carries (see :func:`staggered`)."""
    marker = block.ops.get(MARKER_OP)
    return (marker.count if marker else 0) == rank_of(block.name)


def _all(fns_args) -> list:
    """Run one call per party concurrently and wait for all of them (a party's failure makes its
    peers fail after the link's receive timeout: no overall deadline, and no early return that
    would leave threads running SPU)."""
    who = [f"sim: party {rank}" for rank in range(len(fns_args))]
    calls = [lambda fn=fn, args=args: fn(*args) for fn, args in fns_args]
    return fan_out(calls, who, "run", explain=lambda err: f"failed: {first_line(err)}", fail_fast=False)


class SimMesh(Mesh):
    """All parties as threads over in-memory links, each profiled."""

    backend = "sim"

    def __init__(
        self,
        world_size: int,
        config: libspu.RuntimeConfig,
        recv_timeout_s: float = RECV_TIMEOUT_S,
        protocol=None,
        store: str | None = None,
    ):
        """``store``: a folder the parties keep published models in (``<store>/party<r>``)."""
        self.world_size = world_size
        self.log = ProcessLog.get()
        desc = libspu.link.Desc()
        desc.recv_timeout_ms = int(recv_timeout_s * 1000)
        for rank in range(world_size):
            desc.add_party(f"party{rank}", f"thread-{rank}")

        def make(rank):
            return ComputeParty(rank, libspu.link.create_mem(desc, rank), config)

        self.parties: list[ComputeParty] = _all([(make, (r,)) for r in range(world_size)])
        self.services = [
            PartyService(
                p.rank,
                world_size,
                lambda p=p: p,
                protocol=protocol,
                store=os.path.join(store, f"party{p.rank}") if store else None,
                code_hook=staggered,
            )
            for p in self.parties
        ]

    def call(self, command: str, per_party: list[dict]) -> list:
        """The command at every party thread, as the session's operator (sim is one trust
        domain: the driver plays owner and client too); collective commands at once, in one
        thread per party, their profiles read from the shared log."""
        if not COMMANDS[command].collective:
            replies = []
            for service in self.services:
                kwargs = per_party.pop(0)
                replies.append(service.handle(ROLES, command, kwargs))
                del kwargs
            return replies
        start = self.log.mark()
        replies = _all([(s.handle, (ROLES, command, kw)) for s, kw in zip(self.services, per_party)])
        per_party.clear()
        seconds = [r if command == "run" else r["profile"] for r in replies]
        profiles = self._profiles(start, seconds)
        if command == "run":
            return profiles
        return [{**r, "profile": messages.put_profile(p)} for r, p in zip(replies, profiles)]

    def _profiles(self, start: int, seconds: list[float]) -> list[RunProfile | None]:
        """Each party's profile block of the run that wrote the log after ``start``."""
        try:
            blocks = parse_profiles(self.log.read_from(start), accept=names_its_party)
        except ValueError as err:
            log.warning("sim: a run not profiled per party (%s)", err)
            return [None] * self.world_size
        profiles: list[RunProfile | None] = [None] * self.world_size
        for block in blocks:
            rank = rank_of(block.name)
            marker = block.ops.pop(MARKER_OP, None) if rank else None
            block.link.rank = rank
            block.link.seconds = seconds[rank] - (marker.seconds if marker else 0.0)
            profiles[rank] = block
        return profiles

    def close(self) -> None:
        self.parties = []
        self.services = []


def open_mesh(request) -> SimMesh:
    """The sim backend's mesh for a :class:`puma.runtime.MeshRequest`."""
    protocol = request.protocol
    return SimMesh(protocol.world_size, protocol.runtime_config(), request.recv_timeout_s, protocol)
