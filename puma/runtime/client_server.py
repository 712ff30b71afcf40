"""Client-server mode: private inference between the model owner and the client alone.

There is no third party. The owner runs party 0 on its own host (``puma owner serve``): it
holds its weights, publishes them into that party's own store and serves clients one job at a
time. The client runs party 1 itself, inside its ``puma generate`` process, for the length of
its job. The two compute with ``cheetah`` (2PC without a dealer: its correlated randomness
comes from oblivious transfer and homomorphic encryption between the two, so neither controls
it). Topology: ``mode: client-server`` (``configs/client-server.yaml``).

Who sees what:

- **owner's party**: the weights, its own, kept as its private values (SPU's colocated
  optimization: :mod:`puma.runtime.sharing`, ``owner_private``); the client's *shares* of its
  inputs and of every activation (uniformly random); public shapes, positions and program specs.
  Never an input, an activation or an output in the clear: the outputs' shares go only to the
  client.
- **client**: its inputs, the public manifest (config, tokenizer, calibrated format, policy;
  signed by the owner), its own party's shares of every activation, and the revealed outputs.
  Nothing of a weight: its party holds a placeholder (zeros) of each weight's public shape, which
  SPU's kernels never read. The owner's party obeys the command table of
  :mod:`puma.runtime.commands` (``client_manifest`` gives the signed manifest only; no command
  sends a weight) and builds and compiles each program itself from the manifest, under the
  owner's policy (tasks, sets, reveal modes).

A product of an activation by a weight is cheetah's product of a secret by the owner's private
matrix: one homomorphic product (BumbleBee's) where two secret shares would need two.

Both are semi-honest: a party that deviates can make results wrong. Two parties hold every
share, so the guarantee needs no honest majority: each alone learns nothing beyond its output
(client) or nothing (owner).

The client's party obeys the same command table, given in-process (typed frames encoded and
decoded as on a connection), so one definition of the party's operations serves both ends.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading

from puma.errors import PumaError
from puma.runtime import commands, compile_cache, memory, programs, sharing
from puma.runtime.commands import CLIENT
from puma.runtime.config import LINKS_DID_NOT_CONNECT, Topology
from puma.runtime.fanout import fan_out, first_line
from puma.runtime.nodes import NodesMesh

log = logging.getLogger(__name__)


class ClientParty(commands.PartyService):
    """Party 1, run by the client for one job: the owner's manifest (its signature checked),
    placeholders of the owner's private weights (:func:`puma.runtime.sharing.placeholder`), and
    the links to the owner's party."""

    def __init__(self, topology: Topology, manifest: dict, signature: bytes):
        self.topology = topology
        tls = topology.require_tls()
        self._link_tls = (*tls.party_link(topology.parties[1].id), tls.links_ca)
        for path in self._link_tls:
            if not os.path.isfile(path):
                raise PumaError(
                    f"{path} is missing: the client's party needs its link certificate from the owner's "
                    f"puma node certs -c {topology.source}"
                )
        owner_cert = tls.owner(topology.owner)[0]
        from puma.runtime.party import ProcessLog

        super().__init__(
            1,
            2,
            self._open_links,
            protocol=topology.protocol,
            store=tempfile.mkdtemp(prefix="puma-client-party-"),
            process_log=ProcessLog.get(),  # SPU's log of this process: the party's per-run profile
            verify=lambda body, sig: _verify(owner_cert, body, sig),
        )
        try:
            self.model = self._on_publish(manifest, signature)["model"]
            self._publishing.clear()
            open(os.path.join(self._model_dir(self.model), "complete"), "w").close()
        except PermissionError as err:
            shutil.rmtree(self.store, ignore_errors=True)
            raise PumaError(f"the owner's party sent a manifest not signed by the owner of {topology.source}") from err
        except BaseException:
            shutil.rmtree(self.store, ignore_errors=True)
            raise

    def _open_links(self):
        import spu.libspu as libspu

        from puma.runtime.party import ComputeParty, link_desc

        t = self.topology
        desc = link_desc([(p.id, p.link) for p in t.parties], t.connect_timeout_s, t.recv_timeout_s, self._link_tls)
        try:
            return ComputeParty(1, libspu.link.create_brpc(desc, 1), t.protocol.runtime_config())
        except RuntimeError as err:
            raise PumaError(f"the client's party: {LINKS_DID_NOT_CONNECT} ({first_line(err)})") from err

    def program_cache(self) -> str | None:
        """The client's own cache folder (its store lasts one job)."""
        return compile_cache.user_folder()

    def _ensure_weights(self, view, names: list[str]) -> list[str]:
        """This party's placeholders of the owner's private weights ``names``."""
        held = self.resident.setdefault(view.model_id, set())
        missing = [n for n in names if n not in held]
        avals = programs.flat_named_avals(view.param_avals)
        for name in missing:
            weight = name[len(view.weights_prefix) :]
            self.party.set(name, sharing.placeholder(avals[weight].shape, self.protocol.field))
        held.update(missing)
        return missing

    def close(self) -> None:
        """Stop the links (the owner's party stops its own at the same time) and forget the job."""
        try:
            if self.has_links:
                self.reset_links()
        finally:
            shutil.rmtree(self.store, ignore_errors=True)


def _verify(cert: str, body: dict, signature: bytes) -> None:
    from puma.runtime import certs

    if not certs.verify(cert, certs.canonical(body), signature):
        raise PermissionError("the manifest is not signed by this deployment's model owner")


class ClientServerMesh(NodesMesh):
    """A client's job in client-server mode: the owner's party over its control connection
    (queue, ticket, idle limit and keep-alive as on ``nodes``) and the client's own party in
    this process. Rank 0 is the owner's party, rank 1 the client's."""

    def __init__(self, topology: Topology, name: str | None, model: str | None):
        super().__init__(_file_protocol(topology), CLIENT, name, model)
        try:
            doc = self._exchange(0, commands.encode("client_manifest", {"model": self.model}), "json")
            self.local = ClientParty(self.topology, doc["manifest"], bytes.fromhex(doc["signature"]))
            host = memory.host()
            self.pids.append(os.getpid())
            self.server_pids.append(os.getpid())
            self.hosts.append(host)
            self.heaps.append(bool(memory.heap_kept()))
        except BaseException:
            super().close()
            raise

    def _party(self, rank: int) -> str:
        return "the client's own party (rank 1)" if rank == 1 else super()._party(rank)

    def _local(self, frame):
        """Give the client's party one command, as a connection would (typed frame in and out)."""
        spec, kwargs = commands.decode(frame)
        try:
            reply = self.local.handle(frozenset({CLIENT}), spec.name, kwargs)
        except PumaError as err:
            raise PumaError(f"the client's own party: {err}") from err
        return commands.decode_reply(spec.reply, commands.encode_reply(spec.reply, reply))

    def call(self, command: str, per_party: list[dict]) -> list:
        reply = commands.COMMANDS[command].reply
        frames = self.frames(command, per_party)
        return fan_out(
            [lambda: self._exchange(0, frames[0], reply), lambda: self._local(frames[1])],
            [self._party(0), self._party(1)],
            f"answer {command!r}",
            explain=lambda err: f"failed ({first_line(err)})",
        )

    def broadcast(self, command: str, **kwargs) -> list:
        return self.call(command, [dict(kwargs), dict(kwargs)])

    def close(self) -> None:
        """End the job: the owner's party and this one stop their links together (a handshake),
        then the connection closes."""
        local = getattr(self, "local", None)
        stopper = None
        if local is not None and local.has_links:
            stopper = threading.Thread(target=local.close, daemon=True)
            stopper.start()
        try:
            super().close()
        finally:
            if stopper is not None:
                stopper.join(self.topology.recv_timeout_s)
                if stopper.is_alive():
                    log.warning(
                        "the client's party did not close its links within %.0f s", self.topology.recv_timeout_s
                    )
            elif local is not None:
                local.close()
            self.local = None


def _file_protocol(topology: Topology) -> Topology:
    """The topology with its file's own protocol settings: the owner's party runs exactly those
    (a set's runtime settings do not reach a served party), and both ends must match."""
    if os.path.isfile(topology.source):
        return dataclasses.replace(topology, protocol=Topology.from_yaml(topology.source).protocol)
    return topology
