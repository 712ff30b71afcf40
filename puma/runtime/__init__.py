"""Backends that run programs: ``plaintext`` and the secure ``sim``, ``nodes`` and ``ray`` meshes.

:data:`BACKENDS` is the one table of backends (the CLI's ``--backend`` choices, the benchmarks
and the tests read it). A secure backend is a module with ``open_mesh(request: MeshRequest) ->
Mesh``; adding one is that module plus one line here. :func:`open_session` builds a session from
declarative settings: a topology file (``--config``) and command-line overrides (``protocol``,
``fxp_bits``, ``field``), plus the SPU settings of the approximation set in use. Importing this
package loads no backend (nor JAX).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import TYPE_CHECKING

from puma import progress
from puma.errors import PumaError
from puma.runtime.config import CONNECT_TIMEOUT_S, DEALER_IN_ONE_DOMAIN, RECV_TIMEOUT_S, ProtocolConfig, Topology

if TYPE_CHECKING:
    from puma.runtime.base import Session


@dataclasses.dataclass(frozen=True)
class Backend:
    """Where programs run. ``module`` holds ``open_mesh`` (None: plaintext, no parties);
    ``in_process``: every party (or none) lives in the driver's process, so memory budgets
    count them together; ``needs_topology``: parties are found through a topology file;
    ``publishes``: parties are separate trust domains that keep published models in their
    own stores (:mod:`puma.deploy`)."""

    module: str | None
    help: str
    in_process: bool = False
    needs_topology: bool = False
    publishes: bool = False  # the owner publishes models into the parties' own stores; clients run on a manifest

    @property
    def secure(self) -> bool:
        """Whether programs run under MPC (every backend but plaintext)."""
        return self.module is not None


BACKENDS: dict[str, Backend] = {
    "sim": Backend("puma.runtime.sim", "three parties as threads of this process", in_process=True),
    "nodes": Backend(
        "puma.runtime.nodes", "party processes at the topology's addresses", needs_topology=True, publishes=True
    ),
    "ray": Backend("puma.runtime.ray_mesh", "parties as Ray actors (local Ray, or --ray-address)"),
    "plaintext": Backend(None, "no MPC: everything in the clear", in_process=True),
}


@dataclasses.dataclass(frozen=True)
class MeshRequest:
    """What a backend's ``open_mesh`` gets: protocol settings, the topology file's content (if
    one was given), timeouts, and a cluster address (Ray)."""

    protocol: ProtocolConfig
    topology: Topology | None = None
    recv_timeout_s: float = RECV_TIMEOUT_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    address: str | None = None
    token: str | None = None
    identity: str | None = None  # nodes: the client name whose certificate the driver uses
    model: str | None = None  # nodes: the published model the job runs on


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise PumaError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def resolve_topology(
    config: str | None = None, protocol: str | None = None, fxp_bits: int | None = None, field: str | None = None
) -> tuple[Topology | None, ProtocolConfig]:
    """The topology (if a file is given) and the protocol settings after overrides."""
    topology = Topology.from_yaml(config) if config else None
    base = topology.protocol if topology else ProtocolConfig()
    changes = {k: v for k, v in (("protocol", protocol), ("fxp_bits", fxp_bits), ("field", field)) if v is not None}
    proto = dataclasses.replace(base, **changes) if changes else base
    if topology is not None and proto.world_size != topology.world_size:
        raise PumaError(
            f"protocol {proto.protocol} needs {proto.world_size} parties but {config} lists {topology.world_size}: "
            f"use a {proto.world_size}-party topology"
        )
    return topology, proto


def open_session(
    backend: str = "plaintext",
    *,
    config: str | None = None,
    protocol: str | None = None,
    fxp_bits: int | None = None,
    field: str | None = None,
    spu_settings=None,
    recv_timeout_s: float | None = None,
    ray_address: str | None = None,
    ray_token: str | None = None,
    identity: str | None = None,
    model: str | None = None,
) -> Session:
    """Open a session on ``backend`` (a key of :data:`BACKENDS`).

    ``config`` is a topology file (required where the backend ``needs_topology``; optional
    elsewhere, where it supplies protocol settings and timeouts). ``spu_settings`` are the
    approximation set's SPU settings. On ``nodes`` the session is a client's job on the
    published ``model`` (its id), with the certificate of client ``identity`` (default: the
    topology's first client).
    """
    chosen = get_backend(backend)
    if not chosen.secure:
        from puma.runtime.base import PlaintextSession

        return PlaintextSession()
    from puma.runtime.secure import SecureSession

    topology, proto = resolve_topology(config, protocol, fxp_bits, field)
    if chosen.needs_topology and topology is None:
        raise PumaError(f"the {backend} backend needs a topology: pass --config configs/3pc.yaml")
    if proto.first_party_dealer and not chosen.publishes:  # nodes refuses it (Topology.require_separate_domains)
        _warn_first_party_dealer()
    if spu_settings is not None:
        proto = proto.with_settings(spu_settings)
    request = MeshRequest(
        proto,
        topology.with_protocol(proto) if topology else None,
        recv_timeout_s or (topology.recv_timeout_s if topology else RECV_TIMEOUT_S),
        topology.connect_timeout_s if topology else CONNECT_TIMEOUT_S,
        ray_address,
        ray_token,
        identity,
        model,
    )
    mesh = importlib.import_module(chosen.module).open_mesh(request)
    return SecureSession(mesh, proto, chosen.in_process, backend)


@functools.cache
def _warn_first_party_dealer() -> None:
    """Say once per process that semi2k's dealer is party 0 (``sim`` and ``ray`` keep SPU's
    default: one trust domain, for development)."""
    progress.warn(DEALER_IN_ONE_DOMAIN)
