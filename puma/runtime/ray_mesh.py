"""The ``ray`` backend: every computing party is a Ray actor, linked by SPU's brpc links.

By default a local Ray instance is started (``ray.init()``); ``address`` joins an existing
cluster. Actors take ``num_cpus=0`` (a party spends its time waiting on its peers; reserving
CPUs would deadlock the mesh on a small machine). Placement follows Ray resources: if the cluster
defines a custom resource ``puma_party<r>`` (``ray start --resources='{"puma_party0": 1}'``),
party r is placed on a node that has it.

Shares travel as object references straight to their party: the driver puts each party's bundle
in the object store and passes only the reference to that party's actor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

from puma.errors import PumaError
from puma.runtime import certs, memory
from puma.runtime.config import CONNECT_TIMEOUT_S, LINKS_DID_NOT_CONNECT, RECV_TIMEOUT_S, ProtocolConfig
from puma.runtime.fanout import fan_out, first_line
from puma.runtime.roles import CHUNK_BYTES
from puma.runtime.secure import Mesh

log = logging.getLogger(__name__)


def _normal_priority() -> None:
    """Undo the low CPU priority (nice 15) Ray gives worker processes, where allowed.

    The parties advance in lock step: one starved party stalls the other two, so a party
    actor runs at the priority of an ordinary process.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (PermissionError, OSError) as err:
        log.info("party actor keeps Ray's worker priority: %s", err)


class PartyActor:
    """Body of the Ray actor hosting one computing party (wrapped by ``ray.remote`` lazily)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.party = None
        self.process_log = None
        _normal_priority()

    def host(self) -> tuple[str, int, bool]:
        return (*memory.host(), memory.heap_kept())

    def address(self, loopback: bool) -> str:
        """A free TCP port for the party's MPC link: on 127.0.0.1 for a local Ray (nothing
        listens on the machine's network), on this node's address in a cluster."""
        import ray

        host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        return f"{host}:{port}"

    def open(
        self,
        addresses: list[str],
        runtime_config_bytes: bytes,
        recv_timeout_s: float,
        connect_s: float,
        tls=None,
        protocol=None,
    ) -> int:
        import os

        import spu.libspu as libspu

        from puma.runtime.commands import PartyService
        from puma.runtime.party import ComputeParty, ProcessLog, link_desc

        self.process_log = ProcessLog.get()
        if tls is not None:
            certs.check(*tls, f"party {self.rank}")
        desc = link_desc([(f"party{r}", addr) for r, addr in enumerate(addresses)], connect_s, recv_timeout_s, tls)
        config = libspu.RuntimeConfig()
        config.ParseFromString(runtime_config_bytes)
        memory.reset_peak()
        party = ComputeParty(self.rank, libspu.link.create_brpc(desc, self.rank), config)
        self.service = PartyService(
            self.rank, len(addresses), lambda: party, protocol=protocol, process_log=self.process_log
        )
        return os.getpid()

    def call(self, command: str, **kwargs):
        """One command of :data:`puma.runtime.commands.COMMANDS`, given by the session's driver
        (Ray is one organization's cluster: one trust domain, the driver holds every role)."""
        from puma.runtime.commands import CLIENT, OPERATOR, OWNER

        return self.service.handle(frozenset({OPERATOR, OWNER, CLIENT}), command, kwargs)


class OwnerActor:
    """Body of the Ray actor playing the model owner: it opens the weights lazily in its own
    process and, on request, puts bundles of shares (one per party and chunk) in the object
    store. It never receives inputs or outputs."""

    def __init__(self, spec, runtime_config_bytes: bytes, world_size: int):
        import spu.libspu as libspu

        _normal_priority()
        from puma.runtime.roles import ModelOwner, share_function

        config = libspu.RuntimeConfig()
        config.ParseFromString(runtime_config_bytes)
        self._owner = ModelOwner.from_spec(spec)
        self._share = share_function(config, world_size)
        self._world_size = world_size
        self._chunks = None

    def pid(self) -> int:
        return os.getpid()

    def peak_rss(self) -> int:
        return memory.peak_rss()

    def start(self, names: list[str] | None, chunk_bytes: int) -> None:
        """Begin sharing ``names`` (default all); :meth:`next_chunk` hands them out."""
        self._chunks = self._owner.share_chunks(self._share, self._world_size, names, chunk_bytes)

    def next_chunk(self) -> tuple[list, int] | None:
        """(one object ref per party, bytes of shares) for the next chunk, or None when done."""
        import ray

        bundles = next(self._chunks, None)
        if bundles is None:
            return None
        nbytes = sum(b.nbytes for b in bundles)
        refs = []
        while bundles:
            refs.append(ray.put(bundles.pop(0)))
        return refs, nbytes  # each party's bundle goes from this actor to that party only


def _actor_env() -> dict:
    """Party and owner actors start keeping freed memory (:mod:`puma.runtime.memory`)."""
    extra = memory.heap_env()
    return {"env_vars": extra} if extra else {}


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` with one line when the Ray cluster at ``host:port`` (or
    ``ray://host:port``) does not accept connections: ``ray.init`` itself may wait for minutes."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms are Ray's to resolve
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)).close()
            return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise PumaError(
                    f"the Ray cluster at {address} is unreachable after {timeout_s:.0f} s ({err}): "
                    "start it (ray start --head) or fix --ray-address"
                ) from err
            time.sleep(0.5)


def check_token(address: str, token: str | None, timeout_s: float) -> None:
    """Fail within ``timeout_s`` with one line when the cluster at ``host:port`` wants a token
    that is missing or refuses the one given. ``ray.init`` would retry for about 20 s, print
    Ray's warnings and then blame an address the user never gave. The check is one call to the
    GCS (``GetClusterId``) carrying the token as Ray sends it; any answer other than
    "unauthenticated" is left to ``ray.init``."""
    if "://" in address:
        return  # Ray Client (ray://) and other schemes authenticate on their own
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=timeout_s)
            return
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                return
    if token:
        raise PumaError(
            f"the Ray cluster at {address} refused the token given (--ray-token or RAY_AUTH_TOKEN): "
            "use the one `ray get-auth-token` prints on its head node"
        )
    if _default_token():
        return  # Ray finds its saved token (~/.ray/auth_token) by itself
    raise PumaError(
        f"the Ray cluster at {address} uses token authentication: "
        'pass --ray-token "$(ray get-auth-token)" (run on its head node) or set RAY_AUTH_TOKEN'
    )


_PROBE = """
import logging, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level=logging.ERROR)
ray.shutdown()
"""


def check_registers(address: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` with one line when the cluster accepts connections but does not
    register a driver: ``ray.init`` would then wait without end, holding Python's lock so that
    no timer in this process can fire (seen when a node has lost its saved token). The probe is
    a throw-away driver in a child process (about a second; it appears in the cluster's job
    list); whatever else it meets is left for ``ray.init`` here to report."""
    probe = subprocess.Popen(
        [sys.executable, "-c", _PROBE, address],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        probe.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise PumaError(
            f"the Ray cluster at {address} accepts connections but did not register a driver within "
            f"{timeout_s:.0f} s: check its nodes (`ray status`; each node needs the cluster's token, "
            "e.g. in ~/.ray/auth_token) and the head's logs (session_latest/logs in its temp folder)"
        ) from None
    finally:
        if probe.poll() is None:
            os.killpg(probe.pid, signal.SIGKILL)
            probe.wait()


def _default_token() -> bool:
    """Whether Ray would authenticate with a token it keeps (``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``) when none is given."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return os.path.isfile(path) and os.path.getsize(path) > 0


#: yacl's words when a party's link port was taken before brpc listened on it, and how many
#: times :class:`RayMesh` then starts new parties on new ports.
_PORT_TAKEN = "brpc server failed start"
_LINK_ATTEMPTS = 3
#: What to check when the cluster does not start the actors puma asked for.
_ACTORS_DID_NOT_START = (
    "the Ray cluster did not start its actors (see `ray status` for resources "
    "and the cluster's worker logs, e.g. for authentication errors)"
)


@contextlib.contextmanager
def _own_sigterm():
    """Keep this process's SIGTERM handler across ``ray.init``, which installs one that exits
    with status 15 (the CLI's closes sessions and reports the signal)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


class RayMesh(Mesh):
    """Parties as Ray actors (local Ray by default, or the cluster at ``address``)."""

    backend = "ray"

    def __init__(
        self,
        protocol: ProtocolConfig,
        recv_timeout_s: float = RECV_TIMEOUT_S,
        address: str | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        tls=None,
        token: str | None = None,
        party_ids: list[str] | None = None,
    ):
        """Parties for ``protocol``; links honour the timeouts and, with ``tls`` (a topology's
        :class:`~puma.runtime.config.TLSConfig`, its files present on every node), mutual TLS
        with each party's link certificate (``party_ids``: the topology's ids).
        ``token`` authenticates to a cluster with Ray's token authentication (the default of
        ``ray start --head`` since Ray 2.59; ``RAY_AUTH_TOKEN`` in the environment works too)."""
        token = token or os.environ.get("RAY_AUTH_TOKEN")
        if token:  # before Ray is imported: it reads its authentication settings then, and
            # ignores RAY_AUTH_TOKEN unless RAY_AUTH_MODE says "token"
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = token
        import ray

        if address and not ray.is_initialized():
            check_reachable(address, connect_timeout_s)
            check_token(address, token, connect_timeout_s)
            check_registers(address, connect_timeout_s)
        self.world_size = protocol.world_size
        party_ids = party_ids or [f"party{r}" for r in range(self.world_size)]
        self.timeout = recv_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._started_ray = False
        self.actors = []
        if not ray.is_initialized():
            try:
                with warnings.catch_warnings(), _own_sigterm():
                    # Ray starts its daemons with fork+exec, which JAX warns about needlessly
                    warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
                    if address:
                        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                    else:
                        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
                        self._started_ray = True
            except (ConnectionError, RuntimeError, ValueError) as err:
                hint = ""
                if address:
                    hint = (
                        "; if the cluster uses token authentication (ray start --head does since Ray 2.59), "
                        'pass --ray-token "$(ray get-auth-token)" or set RAY_AUTH_TOKEN'
                    )
                where = f" at {address}" if address else ""
                raise PumaError(f"cannot start or reach Ray{where}: {first_line(err)}{hint}") from err
        links = [tls and (*tls.party_link(party_ids[r]), tls.links_ca) for r in range(self.world_size)]
        config = protocol.runtime_config().SerializeToString()
        for attempt in range(1, _LINK_ATTEMPTS + 1):
            try:
                self._open_parties(not address, config, links, protocol)
                return
            except PumaError as err:
                self.close_parties()
                if _PORT_TAKEN not in str(err) or attempt == _LINK_ATTEMPTS:
                    self.close()
                    raise
                log.warning("a party's link port was taken before it listened; new parties, new ports: %s", err)
            except BaseException:
                self.close()
                raise

    def _open_parties(self, loopback: bool, config: bytes, links: list, protocol) -> None:
        """Start one actor per party, each on a port it found free, and connect their links. A
        port is found free before brpc listens on it, so another process may take it between:
        the caller retries on that failure alone."""
        import ray

        resources = ray.cluster_resources()
        actor_cls = ray.remote(PartyActor)
        for rank in range(self.world_size):
            options = {"num_cpus": 0, "runtime_env": _actor_env()}
            tag = f"puma_party{rank}"
            if tag in resources:
                options["resources"] = {tag: 0.001}
            self.actors.append(actor_cls.options(**options).remote(rank))
        addresses = self._started([a.address.remote(loopback) for a in self.actors])
        hosts = self._started([a.host.remote() for a in self.actors])
        self.hosts = [(name, free) for name, free, _ in hosts]
        self.heaps = [kept for _, _, kept in hosts]
        self._get(
            [
                a.open.remote(addresses, config, self.timeout, self.connect_timeout_s, link, protocol)
                for a, link in zip(self.actors, links)
            ],
            "open links",
            timeout=self.connect_timeout_s + 30,
            timeout_hint=LINKS_DID_NOT_CONNECT,
        )

    def _started(self, refs, who: list[str] | None = None) -> list:
        """Wait up to ``connect_s`` for actors' first answers: an actor the cluster cannot
        place (resources) or start (workers that fail to register) would keep Ray waiting."""
        return self._get(refs, "start", timeout=self.connect_timeout_s, who=who, timeout_hint=_ACTORS_DID_NOT_START)

    def _get(
        self,
        refs,
        what: str,
        timeout: float | None = None,
        who: list[str] | None = None,
        timeout_hint: str | None = None,
    ) -> list:
        """Wait for one call per party (or per actor named in ``who``); the first failure raises,
        naming the actor."""
        import ray

        def explain(err: BaseException) -> str:
            if isinstance(err, ray.exceptions.RayActorError):
                return f"died during {what} ({type(err).__name__})"
            if isinstance(err, ray.exceptions.RayTaskError):
                return f"failed during {what}: {first_line(err.cause if getattr(err, 'cause', None) else err)}"
            return f"failed during {what}: {first_line(err)}"

        def get(ref):
            try:
                return ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                if isinstance(getattr(err, "cause", None), PumaError):
                    raise PumaError(str(err.cause)) from None  # named its own failure, as in-process
                raise

        names = [f"ray: {name}" for name in (who or [f"party {rank}" for rank in range(len(refs))])]
        calls = [lambda ref=ref: get(ref) for ref in refs]
        return fan_out(calls, names, what, timeout, explain, timeout_hint=timeout_hint)

    def open_owner(self, spec, runtime_config: bytes) -> None:
        """Run the model owner as its own actor; its share bundles go by reference to the parties."""
        import ray

        self._owner = (
            ray.remote(OwnerActor)
            .options(num_cpus=0, runtime_env=_actor_env())
            .remote(spec, runtime_config, self.world_size)
        )
        try:
            self.owner_pid = self._started([self._owner.pid.remote()], who=["the model owner"])[0]
        except BaseException:
            self.close_owner()
            raise

    def owner_share(self, names: list[str] | None = None, chunk_bytes: int = CHUNK_BYTES) -> int:
        owner = self._owner
        total = 0
        self._get([owner.start.remote(names, chunk_bytes)], "share weights", who=["the model owner"])
        while chunk := self._get([owner.next_chunk.remote()], "share weights", who=["the model owner"])[0]:
            refs, nbytes = chunk
            self._get(
                [a.call.remote("weights", bundle=ref) for a, ref in zip(self.actors, refs)], "receive weight shares"
            )
            total += nbytes
        return total

    def owner_peak_rss(self) -> int:
        owner = getattr(self, "_owner", None)
        if owner is None:
            return 0
        try:
            return self._get([owner.peak_rss.remote()], "report its memory", timeout=30, who=["the model owner"])[0]
        except PumaError:
            return 0

    def close_owner(self) -> int:
        import ray

        peak = self.owner_peak_rss()
        owner, self._owner = getattr(self, "_owner", None), None
        if owner is not None:
            ray.kill(owner)
        return peak

    def call(self, command: str, per_party: list[dict]) -> list:
        import ray

        refs = []
        while per_party:
            kwargs = per_party.pop(0)
            if "bundle" in kwargs:  # shares go to the object store, their party gets the reference
                kwargs["bundle"] = ray.put(kwargs["bundle"])
            refs.append(self.actors[len(refs)].call.remote(command, **kwargs))
        return self._get(refs, command)

    def close_parties(self) -> None:
        import ray

        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        self.actors = []

    def close(self) -> None:
        import ray

        self.close_owner()
        self.close_parties()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


def open_mesh(request) -> RayMesh:
    """The ray backend's mesh for a :class:`puma.runtime.MeshRequest`."""
    topology = request.topology
    return RayMesh(
        request.protocol,
        request.recv_timeout_s,
        request.address,
        request.connect_timeout_s,
        topology and topology.tls,
        request.token,
        topology and [p.id for p in topology.parties],
    )
