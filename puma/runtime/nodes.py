"""The ``nodes`` backend: one OS process per computing party, linked by SPU's brpc links.

A party (:class:`PartyServer`, started by ``puma node start -c TOPOLOGY --rank N`` on its host,
or all local parties at once by ``puma node up -c TOPOLOGY``) listens on its control address.
A driver (:class:`NodesMesh`, the client and model-owner side) connects to every party, and
for the length of that job session the parties open their MPC links to each other, receive
shares and programs, run, and hand output shares back. When the driver leaves, the parties close
the session and wait for the next job: parties serve many jobs without restarting.

Faults end in one clear error naming the party and the cause, within a bounded time:

- a party that is not up: the driver retries its control address for ``connect_s`` seconds;
- a party that dies: its control connection drops (the driver fails at once); its peers stop
  waiting after ``recv_s`` seconds, report the timeout and reset for the next job;
- yacl may ``exit(-1)`` a party whose sends keep failing, so ``node up`` checks every party's
  exit status and stops the rest when one dies;
- a job for another protocol, a port already in use, a malformed topology: refused with a
  message.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time

from puma.errors import PumaError
from puma.runtime import memory, wire
from puma.runtime.config import PartySpec, ProtocolConfig, Topology
from puma.runtime.cost import RunProfile
from puma.runtime.roles import PartyShares
from puma.runtime.secure import Mesh

log = logging.getLogger(__name__)

#: Bytes of shares above which a delivery goes to one party at a time (bounds the driver's
#: pickled copies in flight).
BIG_DELIVERY = 256 << 20


def link_desc(topology: Topology):
    """SPU link description for the topology: addresses, timeouts, retries and TLS."""
    import spu.libspu as libspu

    desc = libspu.link.Desc()
    for p in topology.parties:
        desc.add_party(p.id, p.link)
    interval_ms = 500
    desc.connect_retry_interval_ms = interval_ms
    desc.connect_retry_times = max(1, int(topology.connect_timeout_s * 1000 / interval_ms))
    desc.recv_timeout_ms = int(topology.recv_timeout_s * 1000)
    desc.http_timeout_ms = int(min(topology.recv_timeout_s, 30.0) * 1000)
    # a send to a dead peer is retried for about recv_s, then yacl exit()s the process; the
    # supervisor (node up / node start) reports that exit with the failed link
    desc.retry_opts.retry_interval_ms = 1000
    desc.retry_opts.retry_interval_incr_ms = 0
    desc.retry_opts.max_retry_interval_ms = 1000
    desc.retry_opts.max_retry = max(1, int(topology.recv_timeout_s / 2))
    if topology.tls is not None:
        desc.enable_ssl = True
        for opts in (desc.server_ssl_opts, desc.client_ssl_opts):
            opts.cert.certificate_path = topology.tls.cert
            opts.cert.private_key_path = topology.tls.key
            opts.verify.ca_file_path = topology.tls.ca
            opts.verify.verify_depth = 1
    return desc


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Stacktrace"):
            break
        if line and line != "what:":
            return line[:300]
    return text[:300]


# -- party side ------------------------------------------------------------------------------


class PartyServer:
    """Computing party ``rank`` of ``topology``: serves job sessions from drivers, one at a time."""

    def __init__(self, topology: Topology, rank: int, log_path: str | None = None):
        if not 0 <= rank < topology.world_size:
            raise PumaError(f"rank {rank} is not in the topology (0..{topology.world_size - 1})")
        self.topology = topology
        self.rank = rank
        self.spec: PartySpec = topology.parties[rank]
        self.log_path = log_path
        self.party = None
        self._check_link_port()
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

    def serve_forever(self) -> None:
        from puma.runtime.party import ProcessLog

        self.process_log = ProcessLog.get(self.log_path)
        log.info(
            "party %s (rank %d) ready: control %s, link %s", self.spec.id, self.rank, self.spec.control, self.spec.link
        )
        while True:
            try:
                channel = wire.accept(self.server, self.topology.auth_key, self.topology.tls)
            except PermissionError as err:
                log.warning("party %s: rejected a connection: %s", self.spec.id, _first_line(err))
                continue
            except OSError as err:  # health checks and dropped connections
                log.debug("party %s: connection closed before a session: %s", self.spec.id, _first_line(err))
                continue
            try:
                self._serve(channel)
            finally:
                self._end_session()
                channel.close()

    def _serve(self, channel: wire.Channel) -> None:
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
                log.error("party %s: %s failed: %s", self.spec.id, command, _first_line(err))
                self._end_session()
                channel.send(("error", f"{command} failed: {_first_line(err)}"))
                continue
            try:
                channel.send(("ok", reply))
            except OSError:
                return

    def _end_session(self) -> None:
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
            "host": host,
            "available": free,
            "heap_kept": memory.heap_kept(),
        }

    def _cmd_open(self, runtime_config_bytes: bytes):
        import spu.libspu as libspu

        from puma.runtime.party import ComputeParty

        self._end_session()
        memory.reset_peak()  # this job's reports carry this job's peak
        config = libspu.RuntimeConfig()
        config.ParseFromString(runtime_config_bytes)
        link = libspu.link.create_brpc(link_desc(self.topology), self.rank)
        self.party = ComputeParty(self.rank, link, config)
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
        self._end_session()

    def _cmd_ping(self):
        return None


def serve_party(topology: Topology, rank: int, log_path: str | None = None) -> None:
    """Entry point of a party process: serve until killed."""
    PartyServer(topology, rank, log_path).serve_forever()


# -- supervisor (puma node up / puma node start) -------------------------------------------


def _die_with(parent: int) -> None:
    """End this party process when its supervisor ``parent`` dies, however it dies (SIGKILL
    included), so no party outlives it holding its ports: Linux's parent-death signal, and a
    watchdog on the parent pid where that is not available."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("no parent-death signal here; watching the parent pid")

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def _party_main(topology: Topology, rank: int, log_path: str, verbose: int, parent: int) -> None:
    _die_with(parent)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format=f"%(asctime)s party{rank} %(levelname)s: %(message)s"
    )
    try:
        serve_party(topology, rank, log_path)
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


def supervise(topology: Topology, ranks: list[int], log_dir: str, verbose: int = 0) -> tuple[int, str | None]:
    """Run parties ``ranks`` of ``topology`` as child processes and watch their exit codes.

    yacl may ``exit(-1)`` a party whose link fails, so waiting is not enough: when a party ends,
    the other local parties are stopped and (status, one line saying which party and why) is
    returned; the line is None when the party printed its own (it failed to start).
    SIGINT/SIGTERM stop every party cleanly: (0, None).
    """
    os.makedirs(log_dir, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    procs = {}
    for rank in ranks:
        log_path = os.path.join(log_dir, f"party{rank}.spu.log")
        proc = ctx.Process(
            target=_party_main, args=(topology, rank, log_path, verbose, os.getpid()), name=f"puma-party-{rank}"
        )
        with memory.heap_environ():
            proc.start()
        procs[rank] = (proc, log_path)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    status, message = 0, None
    try:
        while not stop.is_set():
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
            for spec in topology.parties:
                self.channels.append(self._connect(spec))
            hello = self._all([("hello", topology.protocol, self.world_size, spec.rank) for spec in topology.parties])
            self.pids = [h["pid"] for h in hello]
            self.hosts = [(h["host"], h["available"]) for h in hello]
            self.heaps = [bool(h.get("heap_kept")) for h in hello]
            config = topology.protocol.runtime_config().SerializeToString()
            self._all([("open", config)] * self.world_size, timeout=topology.connect_timeout_s + 30)
        except BaseException:
            self.close()
            raise

    def _connect(self, spec: PartySpec) -> wire.Channel:
        host, port = spec.control_host_port
        deadline = time.monotonic() + self.topology.connect_timeout_s
        while True:
            try:
                return wire.connect(host, port, self.topology.auth_key, self.topology.tls, timeout=5.0)
            except wire.HandshakeFailed as err:
                raise PumaError(
                    f"party {spec.id} at {spec.control} did not complete the handshake ({_first_line(err)}): "
                    f"the driver's TLS settings or auth_key differ from the party's"
                ) from err
            except OSError as err:
                if time.monotonic() >= deadline:
                    raise PumaError(
                        f"party {spec.id} (rank {spec.rank}) at {spec.control} is unreachable after "
                        f"{self.topology.connect_timeout_s:.0f} s: {_first_line(err)}; "
                        "is it started (puma node up/start)?"
                    ) from err
                time.sleep(0.3)

    def _all(self, messages: list[tuple], timeout: float | None = None) -> list:
        """Send messages[r] to party r and wait for every reply; fail fast on the first error."""
        results: list = [None] * self.world_size
        errors: list[tuple[int, str]] = []
        done = threading.Condition()
        finished = [False] * self.world_size

        def talk(rank: int):
            spec = self.topology.parties[rank]
            try:
                self.channels[rank].send(messages[rank])
                status, value = self.channels[rank].recv()
                if status == "ok":
                    results[rank] = value
                else:
                    errors.append((rank, f"party {spec.id} (rank {rank}): {value}"))
            except (wire.ChannelClosed, OSError) as err:
                errors.append(
                    (rank, f"party {spec.id} (rank {rank}) died or dropped the connection ({_first_line(err)})")
                )
            with done:
                finished[rank] = True
                done.notify_all()

        for rank in range(self.world_size):
            threading.Thread(target=talk, args=(rank,), daemon=True).start()
        deadline = None if timeout is None else time.monotonic() + timeout
        with done:
            while not all(finished) and not errors:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    slow = [self.topology.parties[r].id for r in range(self.world_size) if not finished[r]]
                    raise PumaError(
                        f"parties {', '.join(slow)} did not answer {messages[0][0]!r} within {timeout:.0f} s"
                    )
                done.wait(None if left is None else min(left, 1.0))
        if errors:
            raise PumaError(errors[0][1])  # the first failure seen; later ones are its fallout
        return results

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
