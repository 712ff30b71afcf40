"""Backends that run programs: ``plaintext`` and the secure ``sim``, ``nodes`` and ``ray`` meshes.

:func:`open_session` builds one from declarative settings: a topology file (``--config``) and
command-line overrides (``protocol``, ``fxp_bits``, ``field``), plus the SPU settings of the
approximation set in use.
"""

from __future__ import annotations

import dataclasses

from puma.errors import PumaError
from puma.runtime.base import PlaintextSession, Session
from puma.runtime.config import ProtocolConfig, Topology

BACKENDS = ("plaintext", "sim", "nodes", "ray")


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
) -> Session:
    """Open a session on ``backend``.

    ``config`` is a topology file (required for ``nodes``; optional elsewhere, where it supplies
    protocol settings). ``spu_settings`` are the approximation set's SPU settings.
    """
    if backend not in BACKENDS:
        raise PumaError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "plaintext":
        return PlaintextSession()
    from puma.runtime.secure import SecureSession

    topology, proto = resolve_topology(config, protocol, fxp_bits, field)
    if spu_settings is not None:
        proto = proto.with_settings(spu_settings)
    timeout = recv_timeout_s or (topology.recv_timeout_s if topology else 60.0)
    if backend == "sim":
        from puma.runtime.sim import SimMesh

        mesh = SimMesh(proto.world_size, proto.runtime_config(), timeout)
    elif backend == "nodes":
        from puma.runtime.nodes import NodesMesh

        if topology is None:
            raise PumaError("the nodes backend needs a topology: pass --config configs/3pc.yaml")
        mesh = NodesMesh(topology.with_protocol(proto))
    else:
        from puma.runtime.ray_mesh import RayMesh

        connect = topology.connect_timeout_s if topology else 30.0
        mesh = RayMesh(proto, timeout, address=ray_address, connect_timeout_s=connect)
    return SecureSession(mesh, proto)
