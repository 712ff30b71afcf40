"""The ``nodes`` backend: one OS process per computing party, linked by SPU's brpc links.

A party (:class:`PartyServer`, started by ``puma node start -c TOPOLOGY --rank N`` on its host,
or all local parties at once by ``puma node up -c TOPOLOGY``) listens on its control address.
A driver (:class:`NodesMesh`, the client and model-owner side) connects to every party, and
for the length of that job session each party runs a job process (:class:`PartyJob`) that
opens the MPC links to its peers, receives shares and programs, runs, and hands output shares
back. When the driver leaves, the job process exits and the server serves the next job.

Faults end in one clear error naming the party and the cause, within a bounded time:

- a party that is not up: the driver retries its control address for ``connect_s`` seconds;
- a party that dies: its control connection drops (the driver fails at once); its peers' job
  processes stop after ``recv_s`` seconds (yacl may ``exit(-1)`` them: they are only job
  processes), their servers log which link failed and serve the next job; a restarted party
  rejoins without restarting the others;
- a second driver while a job runs: told the party is busy, by whom and for how long;
- ``node up`` / ``node start`` check their party servers' exit status and report a death;
- a job for another protocol, a port already in use, a malformed topology: refused with a
  message.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import multiprocessing
import os
import re
import signal
import socket
import sys
import threading
import time
from multiprocessing import reduction

from puma import progress
from puma.errors import PumaError
from puma.runtime import certs, memory, wire
from puma.runtime.children import die_with
from puma.runtime.config import LINKS_DID_NOT_CONNECT, PartySpec, ProtocolConfig, Topology
from puma.runtime.cost import RunProfile
from puma.runtime.fanout import fan_out, first_line
from puma.runtime.party import link_desc
from puma.runtime.roles import PartyShares
from puma.runtime.secure import Mesh

log = logging.getLogger(__name__)

#: Bytes of shares above which a delivery goes to one party at a time (bounds the driver's
#: pickled copies in flight).
BIG_DELIVERY = 256 << 20


# -- party side ------------------------------------------------------------------------------


class PartyServer:
    """Computing party ``rank`` of ``topology``: a server that runs each job in a child process.

    The server itself never loads SPU. It keeps one job process ready (started in advance,
    its imports done) and hands it the connection of the next driver; the job process
    authenticates the driver, opens the MPC links and serves the session (:class:`PartyJob`),
    then exits. A job that fails in any way, yacl's ``exit(-1)`` on a broken link included,
    ends only that process: the server logs why and serves the next job, so a restarted peer
    rejoins without restarting the others. While a job runs, another driver is told the party
    is busy (by whom, for how long) instead of waiting.
    """

    #: Seconds between the server's checks of its job processes.
    POLL_S = 0.2

    def __init__(self, topology: Topology, rank: int, log_path: str | None = None, verbose: int = 0):
        if not 0 <= rank < topology.world_size:
            raise PumaError(f"rank {rank} is not in the topology (0..{topology.world_size - 1})")
        self.topology = topology
        self.rank = rank
        self.spec: PartySpec = topology.parties[rank]
        self.log_path = log_path
        self.verbose = verbose
        self.job: _Job | None = None
        self.standby: _Job | None = None
        self._check_link_port()
        if topology.tls is not None:
            certs.check(topology.tls, f"party {self.spec.id}")
        host, port = self.spec.control_host_port
        try:
            self.server = wire.listen(host, port)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise PumaError(f"party {self.spec.id}: control port {port} is already in use") from err
            raise PumaError(f"party {self.spec.id}: cannot listen on {self.spec.control}: {err}") from err

    def _check_link_port(self) -> None:
        """Refuse to start when the MPC link port is taken (SPU would only fail at job time)."""
        host, _, port = self.spec.link.rpartition(":")
        try:
            wire.listen(host, int(port)).close()
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise PumaError(f"party {self.spec.id}: link port {port} ({self.spec.link}) is already in use") from err
            log.debug("party %s: link address %s not checked here: %s", self.spec.id, self.spec.link, err)

    def serve_forever(self, on_ready=None) -> None:
        """Serve jobs until killed; ``on_ready()`` is called once the party accepts jobs."""
        log.info(
            "party %s (rank %d) ready: control %s, link %s", self.spec.id, self.rank, self.spec.control, self.spec.link
        )
        self.server.settimeout(self.POLL_S)
        try:
            self._reap()
            if on_ready is not None:
                on_ready()
            while True:
                self._reap()
                try:
                    sock, address = self.server.accept()
                except (TimeoutError, socket.timeout):
                    continue
                except OSError as err:
                    log.debug("party %s: accept failed: %s", self.spec.id, err)
                    continue
                sock.settimeout(None)
                if self.job is not None:
                    threading.Thread(target=self._refuse, args=(sock, address), daemon=True).start()
                    continue
                self._start_job(sock, address)
        finally:
            for job in (self.job, self.standby):
                if job is not None and job.proc.is_alive():
                    job.proc.terminate()

    def _spawn(self) -> "_Job":
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(
            target=_job_main,
            args=(theirs, self.topology, self.rank, self.log_path, self.verbose, os.getpid()),
            name=f"puma-job-{self.rank}",
        )
        proc.start()
        theirs.close()
        return _Job(proc, ours)

    def _start_job(self, sock: socket.socket, address) -> None:
        job = self.standby if self.standby is not None and self.standby.proc.is_alive() else self._spawn()
        self.standby = None
        try:
            reduction.send_handle(job.pipe, sock.fileno(), job.proc.pid)
        except OSError as err:
            log.error("party %s: could not hand a job to its process: %s", self.spec.id, err)
            job.proc.terminate()
            return
        finally:
            sock.close()
        job.driver, job.started = f"{address[0]}:{address[1]}", time.monotonic()
        self.job = job

    def _reap(self) -> None:
        """Notice a finished job (say why it failed, if it did) and keep a job process ready."""
        if self.job is not None and not self.job.proc.is_alive():
            code = self.job.proc.exitcode
            if code:
                cause = exit_cause(self.topology, self.log_path) if self.log_path else "see the party's log"
                log.warning(
                    "party %s: the job from %s %s: %s; ready for the next job",
                    self.spec.id,
                    self.job.driver,
                    _describe_status(code),
                    cause,
                )
            self.job.pipe.close()
            self.job = None
        if self.standby is not None and not self.standby.proc.is_alive():
            log.error("party %s: a job process ended before its job (%s)", self.spec.id, self.standby.proc.exitcode)
            self.standby = None
            time.sleep(1.0)  # do not spin if job processes cannot start
        if self.standby is None and self.job is None:
            self.standby = self._spawn()

    def _refuse(self, sock: socket.socket, address) -> None:
        """Tell a second driver that this party is busy, after authenticating it."""
        job = self.job
        try:
            channel = wire.handshake(sock, self.topology.auth_key, self.topology.tls)
            channel.sock.settimeout(wire.HANDSHAKE_TIMEOUT)
            channel.recv()  # the driver's first command
            running = time.monotonic() - job.started if job else 0.0
            holder = job.driver if job else "another driver"
            channel.send(
                (
                    "busy",
                    f"party {self.spec.id} is busy with a job from {holder} (running {running:.0f} s); "
                    "parties serve one job at a time: retry when it ends, or use another set of parties",
                )
            )
            channel.close()
            log.info("party %s: told %s:%s it is busy", self.spec.id, *address)
        except PermissionError as err:
            log.warning("party %s: rejected a connection: %s", self.spec.id, first_line(err))
        except OSError as err:
            log.debug("party %s: a refused connection closed: %s", self.spec.id, first_line(err))


@dataclasses.dataclass
class _Job:
    """A job process of a party server and the pipe its driver's connection goes through."""

    proc: multiprocessing.Process
    pipe: object
    driver: str = ""
    started: float = 0.0


def _job_main(pipe, topology: Topology, rank: int, log_path: str | None, verbose: int, server: int) -> None:
    """A party's job process: wait for a driver's connection from the server, serve that one job."""
    die_with(server)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format=f"%(asctime)s party{rank} %(levelname)s: %(message)s"
    )
    job = PartyJob(topology, rank, log_path)  # imports SPU before the job arrives
    try:
        sock = socket.socket(fileno=reduction.recv_handle(pipe))
    except (EOFError, OSError):
        return  # the server stopped
    try:
        channel = wire.handshake(sock, topology.auth_key, topology.tls)
    except PermissionError as err:
        log.warning("party %s: rejected a connection: %s", job.spec.id, first_line(err))
        return
    except OSError as err:  # health checks and dropped connections
        log.debug("party %s: connection closed before a session: %s", job.spec.id, first_line(err))
        return
    try:
        job.serve(channel)
    finally:
        channel.close()
        # a job process is disposable: no graceful SPU teardown, which can wait a long time on a
        # peer that died (the driver closes sessions it ends cleanly with "close" first)
        logging.shutdown()
        os._exit(0)


class PartyJob:
    """One job of computing party ``rank``: an SPU runtime over the MPC links, driven by the
    commands of one driver's session."""

    def __init__(self, topology: Topology, rank: int, log_path: str | None = None):
        from puma.runtime.party import ComputeParty, ProcessLog

        self._party_cls = ComputeParty
        self.topology = topology
        self.rank = rank
        self.spec: PartySpec = topology.parties[rank]
        self.process_log = ProcessLog.get(log_path)
        self.party = None

    def serve(self, channel: wire.Channel) -> None:
        while True:
            try:
                command, *args = channel.recv()
            except wire.ChannelClosed:
                log.info("party %s: driver left", self.spec.id)
                return
            try:
                reply = getattr(self, f"_cmd_{command}")(*args)
            except PumaError as err:
                channel.send(("error", str(err)))
                continue
            except Exception as err:  # SPU/yacl errors surface as RuntimeError
                log.error("party %s: %s failed: %s", self.spec.id, command, first_line(err))
                self.end_session()
                channel.send(("error", f"{command} failed: {first_line(err)}"))
                continue
            try:
                channel.send(("ok", reply))
            except OSError:
                return

    def end_session(self) -> None:
        if self.party is not None:
            try:
                self.party.close()
            except Exception as err:  # the link may already be broken
                log.debug("party %s: closing session: %s", self.spec.id, err)
            self.party = None

    # commands ----------------------------------------------------------------------------

    def _cmd_hello(self, protocol: ProtocolConfig, world_size: int, rank: int):
        mine = self.topology.protocol
        if (protocol.protocol, protocol.field) != (mine.protocol, mine.field) or world_size != self.topology.world_size:
            raise PumaError(
                f"party {self.spec.id} runs {mine.protocol}/{mine.field} with {self.topology.world_size} parties; "
                f"the job asked for {protocol.protocol}/{protocol.field} with {world_size}"
            )
        if rank != self.rank:
            raise PumaError(f"party {self.spec.id} is rank {self.rank}, the driver expected rank {rank}")
        host, free = memory.host()
        return {
            "id": self.spec.id,
            "pid": os.getpid(),
            "server_pid": os.getppid(),
            "host": host,
            "available": free,
            "heap_kept": memory.heap_kept(),
        }

    def _cmd_open(self, runtime_config_bytes: bytes):
        import spu.libspu as libspu

        self.end_session()
        memory.reset_peak()  # this job's reports carry this job's peak
        config = libspu.RuntimeConfig()
        config.ParseFromString(runtime_config_bytes)
        t = self.topology
        desc = link_desc([(p.id, p.link) for p in t.parties], t.connect_timeout_s, t.recv_timeout_s, t.tls)
        link = libspu.link.create_brpc(desc, self.rank)
        self.party = self._party_cls(self.rank, link, config)
        return None

    def _require(self):
        if self.party is None:
            raise PumaError(f"party {self.spec.id}: no open session")
        return self.party

    def _cmd_deliver(self, bundle: PartyShares):
        self._require().receive(bundle)

    def _cmd_install(self, key: str, name: str, code: bytes):
        self._require().install(key, name, code)

    def _cmd_run(self, key: str, inputs: list[str], outputs: list[str]) -> RunProfile | None:
        return self._require().run_profiled(key, inputs, outputs, self.process_log)

    def _cmd_collect(self, names: list[str]) -> PartyShares:
        return self._require().send(names)

    def _cmd_drop(self, names: list[str]):
        self._require().drop(names)

    def _cmd_store(self, names: list[str], directory: str) -> int:
        return self._require().store(names, directory)

    def _cmd_restore(self, names: list[str], directory: str) -> int:
        return self._require().restore(names, directory)

    def _cmd_close(self):
        self.end_session()

    def _cmd_ping(self):
        return None


def serve_party(topology: Topology, rank: int, log_path: str | None = None, verbose: int = 0, on_ready=None) -> None:
    """Entry point of a party process: serve until killed."""
    PartyServer(topology, rank, log_path, verbose).serve_forever(on_ready)


# -- supervisor (puma node up / puma node start) -------------------------------------------


def _party_main(topology: Topology, rank: int, log_path: str, verbose: int, parent: int, ready) -> None:
    die_with(parent)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format=f"%(asctime)s party{rank} %(levelname)s: %(message)s"
    )
    try:
        serve_party(topology, rank, log_path, verbose, ready.set)
    except PumaError as err:
        print(f"puma: error: {err}", file=sys.stderr, flush=True)
        sys.exit(_STARTUP_FAILED)


_STARTUP_FAILED = 3


_LINK_ERROR = re.compile(r"\[error\].*?(Not connected to|Get data timeout|connect to mesh failed)(.*)")


def exit_cause(topology: Topology, log_path: str) -> str:
    """Why a party process ended, from the last SPU error in its log (naming the peer)."""
    try:
        with open(log_path, errors="replace") as f:
            errors = [m for m in map(_LINK_ERROR.search, f.readlines()[-200:]) if m]
    except OSError:
        errors = []
    if not errors:
        return "see its log " + log_path
    kind, detail = errors[-1].group(1), errors[-1].group(2)
    reason = {
        "Not connected to": "peer unreachable",
        "Get data timeout": "no message within recv_s",
        "connect to mesh failed": "could not connect",
    }[kind]
    for spec in topology.parties:
        if spec.link in kind + detail:
            return f"its link to {spec.id} ({spec.link}) failed ({reason})"
    return f"a link failed ({reason}): {detail.strip()[:200]}"


def _describe_status(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def supervise(
    topology: Topology, ranks: list[int], log_dir: str, verbose: int = 0, on_ready=None
) -> tuple[int, str | None]:
    """Run parties ``ranks`` of ``topology`` as child processes and watch their exit codes;
    ``on_ready()`` is called once every one of them accepts jobs.

    yacl may ``exit(-1)`` a party whose link fails, so waiting is not enough: when a party ends,
    the other local parties are stopped and (status, one line saying which party and why) is
    returned; the line is None when the party printed its own (it failed to start).
    SIGINT/SIGTERM stop every party cleanly: (0, None).
    """
    os.makedirs(log_dir, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    procs = {}
    ready = {rank: ctx.Event() for rank in ranks}
    for rank in ranks:
        log_path = os.path.join(log_dir, f"party{rank}.spu.log")
        proc = ctx.Process(
            target=_party_main,
            args=(topology, rank, log_path, verbose, os.getpid(), ready[rank]),
            name=f"puma-party-{rank}",
        )
        with memory.heap_environ():
            proc.start()
        procs[rank] = (proc, log_path)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    status, message = 0, None
    announced = on_ready is None
    try:
        while not stop.is_set():
            if not announced and all(event.is_set() for event in ready.values()):
                announced = True
                on_ready()
            dead = [(rank, proc, path) for rank, (proc, path) in procs.items() if proc.exitcode is not None]
            if dead:
                rank, proc, path = dead[0]
                spec = topology.parties[rank]
                status = proc.exitcode if proc.exitcode > 0 else 1
                if proc.exitcode != _STARTUP_FAILED:  # a startup failure has printed its own line
                    others = "; stopping the other parties" if len(procs) > 1 else ""
                    message = (
                        f"party {spec.id} (rank {rank}) {_describe_status(proc.exitcode)}: "
                        f"{exit_cause(topology, path)}{others}"
                    )
                break
            stop.wait(0.2)
    finally:
        for proc, _ in procs.values():
            if proc.exitcode is None:
                proc.terminate()
        for proc, _ in procs.values():
            proc.join(5)
            if proc.exitcode is None:
                proc.kill()
        for s, handler in old.items():
            signal.signal(s, handler)
    return status, message


# -- driver side -----------------------------------------------------------------------------


class NodesMesh(Mesh):
    """The driver's view of party processes reachable at the topology's control addresses."""

    backend = "nodes"

    def __init__(self, topology: Topology):
        self.topology = topology
        self.world_size = topology.world_size
        self.channels: list[wire.Channel] = []
        self.pids: list[int] = []
        try:
            hello = self._hello()
            self.pids = [h["pid"] for h in hello]
            self.server_pids = [h["server_pid"] for h in hello]
            self.hosts = [(h["host"], h["available"]) for h in hello]
            self.heaps = [bool(h.get("heap_kept")) for h in hello]
            config = topology.protocol.runtime_config().SerializeToString()
            self._all(
                [("open", config)] * self.world_size,
                timeout=topology.connect_timeout_s + 30,
                timeout_hint=LINKS_DID_NOT_CONNECT,
            )
        except BaseException:
            self.close()
            raise

    def _hello(self) -> list[dict]:
        """Connect to every party and greet it. A party busy with another job is asked again
        until ``connect_s`` has passed (a job that is ending frees it within a second)."""
        deadline = time.monotonic() + self.topology.connect_timeout_s
        greeting = [("hello", self.topology.protocol, self.world_size, spec.rank) for spec in self.topology.parties]
        told = False
        while True:
            self.channels = [self._connect(spec) for spec in self.topology.parties]
            try:
                return self._all(greeting)
            except _Busy as err:
                self.close()
                if not told:
                    told = True
                    progress.status("%s; waiting up to %.0f s", str(err).split(";")[0], deadline - time.monotonic())
                if time.monotonic() >= deadline:
                    raise PumaError(f"{err} (waited {self.topology.connect_timeout_s:.0f} s)") from None
                time.sleep(0.5)

    def _connect(self, spec: PartySpec) -> wire.Channel:
        host, port = spec.control_host_port
        deadline = time.monotonic() + self.topology.connect_timeout_s
        waiting = False
        while True:
            try:
                return wire.connect(host, port, self.topology.auth_key, self.topology.tls, timeout=5.0)
            except wire.HandshakeFailed as err:
                raise PumaError(
                    f"party {spec.id} at {spec.control} did not complete the handshake ({first_line(err)}): "
                    f"the driver's TLS settings or auth_key differ from the party's"
                ) from err
            except OSError as err:
                if not waiting:
                    waiting = True
                    progress.status(
                        "waiting for party %s at %s to come up (up to %.0f s)",
                        spec.id,
                        spec.control,
                        max(0.0, deadline - time.monotonic()),
                    )
                if time.monotonic() >= deadline:
                    raise PumaError(
                        f"party {spec.id} (rank {spec.rank}) at {spec.control} is unreachable after "
                        f"{self.topology.connect_timeout_s:.0f} s: {first_line(err)}; "
                        "is it started (puma node up/start)?"
                    ) from err
                time.sleep(0.3)

    def _all(self, messages: list[tuple], timeout: float | None = None, timeout_hint: str | None = None) -> list:
        """Send messages[r] to party r and wait for every reply; fail fast on the first error."""

        def exchange(rank: int):
            channel = self.channels[rank]
            channel.send(messages[rank])
            status, value = channel.recv()
            if status == "busy":
                raise _Busy(value)
            if status != "ok":
                raise PumaError(f"party {self.topology.parties[rank].id} (rank {rank}): {value}")
            return value

        who = [f"party {spec.id} (rank {spec.rank})" for spec in self.topology.parties]
        return fan_out(
            [lambda rank=rank: exchange(rank) for rank in range(self.world_size)],
            who,
            f"answer {messages[0][0]!r}",
            timeout,
            explain=lambda err: f"died or dropped the connection ({first_line(err)})",
            timeout_hint=timeout_hint,
        )

    def deliver(self, bundles: list[PartyShares]) -> None:
        if sum(b.nbytes for b in bundles) <= BIG_DELIVERY:
            self._all([("deliver", b) for b in bundles])
            bundles.clear()
            return
        while bundles:  # large weight shares: one party at a time, so one pickled copy is in flight
            bundle = bundles.pop(0)
            messages = [("ping",)] * self.world_size
            messages[bundle.rank] = ("deliver", bundle)
            del bundle
            self._all(messages)
            messages = None

    def install(self, key: str, name: str, code: bytes) -> None:
        self._all([("install", key, name, code)] * self.world_size)

    def run(self, key: str, inputs: list[str], outputs: list[str]) -> list[RunProfile | None]:
        return self._all([("run", key, inputs, outputs)] * self.world_size)

    def collect(self, names: list[str]) -> list[PartyShares]:
        return self._all([("collect", names)] * self.world_size)

    def drop(self, names: list[str]) -> None:
        self._all([("drop", names)] * self.world_size)

    def store(self, names: list[str], directory: str) -> list[int]:
        return self._all([("store", names, directory)] * self.world_size)

    def restore(self, names: list[str], directory: str) -> list[int]:
        return self._all([("restore", names, directory)] * self.world_size)

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.channels = []


class _Busy(PumaError):
    """A party answered that it serves another driver's job."""


def open_mesh(request) -> NodesMesh:
    """The nodes backend's mesh for a :class:`puma.runtime.MeshRequest` (it has a topology)."""
    return NodesMesh(request.topology)
