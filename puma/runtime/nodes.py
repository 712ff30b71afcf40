"""The ``nodes`` backend: the computing parties as their own processes, each its own trust domain.

A party (:class:`PartyServer`, started by ``puma node start -c TOPOLOGY --rank N`` on its host,
or all local parties at once by ``puma node up -c TOPOLOGY``) listens on its control address
for mutual-TLS connections. Who connects is read from the peer's certificate
(:mod:`puma.runtime.certs`), and what each identity may ask is the command table
(:mod:`puma.runtime.commands`):

- the **model owner** publishes a model into the party's own store (``<store>/<party id>``, from
  the party's own topology) after the party has checked the owner's signature on its manifest,
  and may remove it; it can read nothing back;
- an admitted **client** (the topology's ``clients``) runs a **job** on a published model: it
  queues at the first party (first come, first served; while it waits it is told its position,
  never who is ahead), receives a ticket that party signs, and presents it to the others, so
  every party serves the same job next. During the job the client sends its input shares and
  program specs; each party builds and compiles the program itself from the manifest, if the
  owner's policy allows it, and returns only that program's output shares to that client. A job
  ends when its client closes it or leaves, or after ``timeouts.job_idle_s`` without progress
  on its connection (the client is told in one line); control connections use TCP keep-alive;
- other parties never use the control port (their link certificates come from another CA);
  anything else (an unknown identity, an unknown or malformed message) is one log line and a
  closed connection.

A party keeps its SPU runtime, links, the shares of the models it serves and its compiled
programs across jobs, so a second query pays neither sharing nor compilation. Links open with
the first job. yacl ends a party's process when a link fails: its supervisor logs why and starts
it again (the store survives; shares reload on the next job), so the survivors of a dead peer
serve the next job once it is back.
"""

from __future__ import annotations

import collections
import errno
import gc
import logging
import multiprocessing
import os
import re
import signal
import socket
import sys
import threading
import time

from puma import progress
from puma.errors import PumaError
from puma.runtime import certs, commands, memory, messages, wire
from puma.runtime.children import die_with
from puma.runtime.commands import CLIENT, OWNER
from puma.runtime.config import LINKS_DID_NOT_CONNECT, PartySpec, Topology
from puma.runtime.fanout import fan_out, first_line
from puma.runtime.messages import Message, MessageError
from puma.runtime.secure import Mesh

log = logging.getLogger(__name__)

#: Commands that belong to a client's job (they need the runtime the job holds).
JOB_COMMANDS = {"inputs", "run_task", "outputs", "free", "client_manifest"}
#: Owner commands that change what the runtime serves: they wait for a running job to end.
EXCLUSIVE = {"publish", "publish_end", "unpublish"}
#: Seconds between the position messages a queued client receives.
QUEUE_TICK_S = 2.0


# -- party side ------------------------------------------------------------------------------


class _Queue:
    """First come, first served admission to the party's runtime (one job at a time)."""

    def __init__(self):
        self._waiting: collections.deque = collections.deque()
        self._busy = False
        self._cond = threading.Condition()
        self._last = 0

    def wait(self, on_position, timeout_s: float) -> int:
        """Block until this caller holds the runtime; ``on_position(position, waited_s)`` every
        few seconds meanwhile. Returns the job number; TimeoutError after ``timeout_s``."""
        me = object()
        start = time.monotonic()
        with self._cond:
            self._waiting.append(me)
            try:
                while self._busy or self._waiting[0] is not me:
                    waited = time.monotonic() - start
                    if waited >= timeout_s:
                        raise TimeoutError(self._waiting.index(me) + (1 if self._busy else 0))
                    on_position(self._waiting.index(me) + (1 if self._busy else 0), waited)
                    self._cond.wait(min(QUEUE_TICK_S, timeout_s - waited))
                self._busy = True
                # job numbers grow across restarts of this party too (milliseconds since the epoch)
                self._last = max(self._last + 1, int(time.time() * 1000))
                return self._last
            finally:
                self._waiting.remove(me)
                self._cond.notify_all()

    def done(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


class PartyServer:
    """Computing party ``rank`` of ``topology``: accepts owners and clients, runs one job at a
    time on its runtime (see the module doc)."""

    def __init__(self, topology: Topology, rank: int, log_path: str | None = None, verbose: int = 0):
        if not 0 <= rank < topology.world_size:
            raise PumaError(f"rank {rank} is not in the topology (0..{topology.world_size - 1})")
        from puma.runtime.party import ProcessLog

        topology.require_separate_domains()
        self.topology = topology
        self.rank = rank
        self.spec: PartySpec = topology.parties[rank]
        tls = topology.require_tls()
        self.tls = tls
        cert, key = tls.party(self.spec.id)
        certs.check(cert, key, tls.ca, f"party {self.spec.id}")
        certs.check(*tls.party_link(self.spec.id), tls.links_ca, f"party {self.spec.id} (link)")
        self.context = certs.server_context(cert, key, tls.ca)
        self.key = key
        run = {"party": self.spec.id, "pid": os.getpid(), "started": time.time()}
        self.greeting = {**run, "signature": certs.sign(key, certs.canonical(run)).hex()}
        self.seen: dict[str, float] = {}  # party id -> start time of the newest run of it met
        self._check_link_port()
        host, port = self.spec.control_host_port
        try:
            self.server = wire.listen(host, port)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise PumaError(f"party {self.spec.id}: control port {port} is already in use") from err
            raise PumaError(f"party {self.spec.id}: cannot listen on {self.spec.control}: {err}") from err
        self.service = commands.PartyService(
            rank,
            topology.world_size,
            self._open_party,
            protocol=topology.protocol,
            store=os.path.join(topology.store, self.spec.id),
            process_log=ProcessLog.get(log_path),
            info=lambda: {"id": self.spec.id, "server_pid": os.getpid(), "greeting": self.greeting},
            verify=self._verify_owner,
            budget=topology.memory_budget,
            serves_clients=topology.client_server,
        )
        self.queue = _Queue()
        self.last_job = 0  # the highest ticket served (ranks after the first)
        self._runtime = threading.Lock()  # the runtime serves one job or one owner at a time

    def _check_link_port(self) -> None:
        """Refuse to start when the MPC link port is taken (SPU would only fail at job time)."""
        host, _, port = self.spec.link.rpartition(":")
        try:
            wire.listen(host, int(port)).close()
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise PumaError(f"party {self.spec.id}: link port {port} ({self.spec.link}) is already in use") from err
            log.debug("party %s: link address %s not checked here: %s", self.spec.id, self.spec.link, err)

    def _open_party(self):
        """The SPU runtime over the MPC links (the first job opens them; peers are waited for
        up to ``connect_s``)."""
        import spu.libspu as libspu

        from puma.runtime.party import ComputeParty, link_desc

        t = self.topology
        memory.reset_peak()
        link_tls = (*self.tls.party_link(self.spec.id), self.tls.links_ca)
        desc = link_desc([(p.id, p.link) for p in t.parties], t.connect_timeout_s, t.recv_timeout_s, link_tls)
        try:
            link = libspu.link.create_brpc(desc, self.rank)
            return ComputeParty(self.rank, link, t.protocol.runtime_config())
        except RuntimeError as err:
            raise PumaError(f"party {self.spec.id}: {LINKS_DID_NOT_CONNECT} ({first_line(err)})") from err

    def _verify_owner(self, manifest: dict, signature: bytes) -> None:
        cert, _ = self.tls.owner(self.topology.owner)
        if not certs.verify(cert, certs.canonical(manifest), signature):
            raise PermissionError("the manifest is not signed by this deployment's model owner")

    def serve_forever(self, on_ready=None) -> None:
        """Serve until killed; ``on_ready()`` once the party accepts connections."""
        log.info(
            "party %s (rank %d) ready: control %s, link %s", self.spec.id, self.rank, self.spec.control, self.spec.link
        )
        if on_ready is not None:
            on_ready()
        while True:
            try:
                sock, address = self.server.accept()
            except OSError as err:
                log.debug("party %s: accept failed: %s", self.spec.id, err)
                continue
            threading.Thread(target=self._connection, args=(sock, address), daemon=True).start()

    def _connection(self, sock: socket.socket, address) -> None:
        where = f"{address[0]}:{address[1]}"
        try:
            channel = wire.accept(sock, self.context)
        except PermissionError as err:
            log.warning("party %s: refused %s: %s", self.spec.id, where, first_line(err))
            return
        except OSError as err:  # handshakes that fail, health checks
            log.info("party %s: connection from %s closed before a session: %s", self.spec.id, where, first_line(err))
            return
        who = channel.peer
        try:
            if who.role == "party" or (who.role == CLIENT and who.name not in self.topology.clients):
                raise PermissionError(f"{who.describe()} is not admitted by this party's topology")
            self._session(channel, frozenset({who.role}))
        except PermissionError as err:
            log.warning("party %s: refused %s from %s: %s", self.spec.id, who.describe(), where, first_line(err))
            _try_send(channel, messages.error(f"party {self.spec.id} refused: {first_line(err)}"))
        except MessageError as err:
            log.warning("party %s: malformed message from %s (%s): %s", self.spec.id, who.describe(), where, err)
        except commands.LinksStale as err:
            log.warning("party %s: %s", self.spec.id, err)
            _try_send(channel, messages.error(f"party {self.spec.id}: {err}", "retry"))
            channel.close()
            logging.shutdown()
            os._exit(RESTART_STATUS)  # the supervisor starts it again, with no links
        except PumaError as err:  # a job not admitted (queue timeout, model not published)
            log.info("party %s: %s", self.spec.id, first_line(err))
            _try_send(channel, messages.error(str(err)))
        except wire.ChannelClosed:
            log.info("party %s: %s left", self.spec.id, who.describe())
        except Exception as err:  # this party's own failure (SPU errors are RuntimeErrors): one line
            log.error("party %s: serving %s failed: %s", self.spec.id, who.describe(), first_line(err))
            _try_send(channel, messages.error(f"party {self.spec.id} failed: {first_line(err)}"))
        finally:
            channel.close()

    def _session(self, channel: wire.Channel, roles: frozenset) -> None:
        """Commands of one connection, until ``close`` or the peer leaves. While the connection
        holds a job, ``timeouts.job_idle_s`` without progress on it (no command, no bytes of one
        or of a reply) ends the job: see :meth:`_idle_line`."""
        held = False
        try:
            while True:
                channel.settimeout(self.topology.job_idle_s if held else None)
                try:
                    message = channel.recv()
                except wire.TimedOut:
                    held = False
                    if self.topology.client_server:  # the line first: ending the links may restart this party
                        self._idle_line(channel)
                        self._end_job()
                    else:
                        self._end_job()
                        self._idle_line(channel)
                    self._await_next(channel)
                    return
                if message.op == "job":
                    if held:
                        raise MessageError("a connection runs one job")
                    self._admit(channel, roles, message)
                    held = True
                    continue
                spec, kwargs = commands.decode(message)
                if spec.name in JOB_COMMANDS and not held:
                    raise PermissionError(f"{spec.name} belongs to a job: ask for one first")
                try:
                    if spec.name in EXCLUSIVE and not held:
                        with self._runtime:  # the owner waits for a running job to end
                            reply = self.service.handle(roles, spec.name, kwargs)
                    else:
                        reply = self.service.handle(roles, spec.name, kwargs)
                except PumaError as err:
                    channel.send(messages.error(f"party {self.spec.id}: {err}"))
                    continue
                channel.send(commands.encode_reply(spec.reply, reply))
                if spec.name == "close":
                    return
        finally:
            if held:
                self._end_job()

    def _end_job(self) -> None:
        """Forget the connection's job (its inputs, outputs and state; in client-server mode its
        links, which were the client's) and hand the runtime to the next client."""
        try:
            self.service.end_job()
            if self.topology.client_server:
                self._drop_links()
        finally:
            self._runtime.release()
            if self.rank == 0:
                self.queue.done()

    def _drop_links(self) -> None:
        """Client-server mode: stop the finished job's links. Stopping is a handshake with the
        client's party; if it does not answer within ``recv_s`` (its host vanished), this party
        restarts (its supervisor starts it again) rather than hold the runtime."""
        if not self.service.has_links:
            return
        done = threading.Event()

        def stop() -> None:
            self.service.reset_links()
            gc.collect()  # the link's server must be gone before the next job listens on its port
            done.set()

        threading.Thread(target=stop, daemon=True).start()
        if not done.wait(self.topology.recv_timeout_s):
            log.warning("party %s: the client's party did not close the job's links: restarting", self.spec.id)
            logging.shutdown()
            os._exit(RESTART_STATUS)

    def _idle_line(self, channel: wire.Channel) -> None:
        """Tell a client whose job this party ended for idleness why, in one line (an ``idle``
        error): sent at once, so that it is the answer to the client's next command."""
        idle = self.topology.job_idle_s
        log.warning(
            "party %s: ended the job of %s after %g s without a command (timeouts.job_idle_s)",
            self.spec.id,
            channel.peer.describe(),
            idle,
        )
        line = (
            f"party {self.spec.id} ended this job after {idle:g} s without a command (timeouts.job_idle_s) "
            "and serves the next client: open a new session"
        )
        _try_send(channel, messages.error(line, "idle"))

    def _await_next(self, channel: wire.Channel) -> None:
        """Read the idle client's next command if it comes within another ``job_idle_s`` (closing
        with it unread would reset the connection before the client reads the line)."""
        try:
            channel.recv()
        except (wire.ChannelClosed, MessageError):
            pass

    def _admit(self, channel: wire.Channel, roles: frozenset, message: Message) -> None:
        """Start a client's job: queue (first party) or check its ticket (the others), then hold
        the runtime. The reply carries the ticket."""
        spec, kwargs = commands.decode(message)
        if not roles & spec.roles:
            raise PermissionError("job is not a command this identity may give")
        self.service.published_view(kwargs["model"])  # refused unless the model is published here
        limit = self.topology.queue_timeout_s
        if self.rank == 0:

            def tell(position: int, waited: float) -> None:
                channel.send(Message("queued", {"position": position, "waited_s": round(waited, 1)}))

            try:
                job = self.queue.wait(tell, limit)
            except TimeoutError as err:
                raise PumaError(f"party {self.spec.id}: gave up after {limit:.0f} s in the queue at position {err}")
            if not self._runtime.acquire(timeout=limit):
                self.queue.done()
                raise PumaError(f"party {self.spec.id}: the runtime stayed busy for {limit:.0f} s")
            ticket = {"job": job, "client": channel.peer.name, "model": kwargs["model"], "issued": time.time()}
            self._start_job(roles, kwargs)
            signature = certs.sign(self.key, certs.canonical(ticket)).hex()
            channel.send(commands.encode_reply("json", {"ticket": ticket, "signature": signature}))
            return
        ticket = self._check_ticket(channel, kwargs)
        if not self._runtime.acquire(timeout=limit):
            raise PumaError(f"party {self.spec.id}: the runtime stayed busy for {limit:.0f} s")
        self.last_job = max(self.last_job, ticket["job"])
        self._start_job(roles, kwargs)
        channel.send(commands.encode_reply("json", {"ticket": ticket}))

    def _start_job(self, roles: frozenset, kwargs: dict) -> None:
        """The admitted job's command (the client holds the runtime now); releases it on failure."""
        try:
            self.service.handle(roles, "job", {**kwargs, "peers": self._check_peers(kwargs["peers"])})
        except BaseException:
            self._runtime.release()
            if self.rank == 0:
                self.queue.done()
            raise

    def _check_peers(self, peers) -> list[dict]:
        """The parties' greetings the client met (one per party, in rank order), each checked
        against that party's signature and none from a run of a party older than one this party
        met: what the service compares with the runs its links were opened with. A client can
        thus make a party open its links anew only when a peer really restarted."""
        parties = self.topology.served
        if not isinstance(peers, list) or len(peers) != len(parties):
            raise PermissionError(
                f"the job names {len(peers) if isinstance(peers, list) else 'no'} peers, not "
                f"{len(parties)} parties' greetings"
            )
        runs, starts = [], {}
        for spec, greeting in zip(parties, peers):
            try:
                run = {key: greeting[key] for key in ("party", "pid", "started")}
                signature = bytes.fromhex(greeting["signature"])
                started = float(run["started"])
            except (TypeError, KeyError, ValueError) as err:
                raise PermissionError(f"not a party's greeting ({err})") from None
            if run["party"] != spec.id or not certs.verify(self.tls.party(spec.id)[0], certs.canonical(run), signature):
                raise PermissionError(f"the greeting of party {spec.id} is not signed by it")
            if started < self.seen.get(spec.id, 0.0):
                raise PermissionError(f"the greeting of party {spec.id} comes from an earlier run of it: connect again")
            runs.append(run)
            starts[spec.id] = started
        self.seen.update(starts)
        return runs

    def _check_ticket(self, channel: wire.Channel, kwargs: dict) -> dict:
        """The first party's ticket for this client, this model and a job not served yet."""
        doc = kwargs["ticket"]
        try:
            ticket, signature = doc["ticket"], bytes.fromhex(doc["signature"])
            first = self.topology.parties[0].id
            valid = certs.verify(self.tls.party(first)[0], certs.canonical(ticket), signature)
        except (TypeError, KeyError, ValueError) as err:
            raise PermissionError(f"not a ticket ({err})") from None
        if not valid:
            raise PermissionError("the ticket is not signed by the first party")
        if ticket.get("client") != channel.peer.name or ticket.get("model") != kwargs["model"]:
            raise PermissionError("the ticket is another client's or for another model")
        if not isinstance(ticket.get("job"), int) or ticket["job"] <= self.last_job:
            raise PermissionError(f"ticket for job {ticket.get('job')} was used already")
        if time.time() - float(ticket.get("issued", 0)) > self.topology.queue_timeout_s:
            raise PermissionError("the ticket expired")
        return ticket


def _try_send(channel: wire.Channel, message: Message) -> None:
    try:
        channel.send(message)
    except (wire.ChannelClosed, OSError):
        pass


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
#: Exit status of a party that restarts itself (its links were opened with a peer that restarted).
RESTART_STATUS = 75
#: Seconds before a party that died is started again.
RESTART_DELAY_S = 1.0


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


class _Flag:
    """A stop flag a signal handler may set: unlike ``threading.Event.set``, which takes a lock
    the interrupted main thread may be holding inside ``Event.wait`` (a deadlock: the
    supervisor then ignores SIGTERM), setting it is one assignment."""

    def __init__(self):
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, in short naps, returning early once set."""
        deadline = time.monotonic() + seconds
        while not self._set and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def supervise(
    topology: Topology, ranks: list[int], log_dir: str, verbose: int = 0, on_ready=None, announce=None
) -> tuple[int, str | None]:
    """Run parties ``ranks`` of ``topology`` as child processes; ``on_ready()`` once every one of
    them accepts connections.

    A party that dies (yacl ends a party whose link fails) is started again after
    :data:`RESTART_DELAY_S`, and ``announce(line)`` says which and why; a party that cannot
    start (exit status 3, having printed its own line) stops the others: (3, None).
    SIGINT/SIGTERM stop every party cleanly: (0, None).
    """
    os.makedirs(log_dir, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    procs = {}

    def start(rank: int):
        log_path = os.path.join(log_dir, f"party{rank}.spu.log")
        event = ctx.Event()
        proc = ctx.Process(
            target=_party_main,
            args=(topology, rank, log_path, verbose, os.getpid(), event),
            name=f"puma-party-{rank}",
        )
        with memory.heap_environ():
            proc.start()
        procs[rank] = (proc, log_path, event)

    for rank in ranks:
        start(rank)
    stop = _Flag()

    def on_signal(signum, frame):
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    status, message = 0, None
    announced = on_ready is None
    try:
        while not stop.is_set():
            if not announced and all(event.is_set() for _, _, event in procs.values()):
                announced = True
                on_ready()
            for rank, (proc, path, _) in list(procs.items()):
                if proc.exitcode is None:
                    continue
                if proc.exitcode == _STARTUP_FAILED:
                    status = _STARTUP_FAILED
                    stop.set()
                    break
                spec = topology.parties[rank]
                cause = (
                    "a peer restarted, its links open anew"
                    if proc.exitcode == RESTART_STATUS
                    else exit_cause(topology, path)
                )
                line = f"party {spec.id} (rank {rank}) {_describe_status(proc.exitcode)}: {cause}"
                (announce or log.warning)(f"{line}; starting it again")
                stop.wait(RESTART_DELAY_S)
                if not stop.is_set():
                    start(rank)
            stop.wait(0.2)
    finally:
        for proc, _, _ in procs.values():
            if proc.exitcode is None:
                proc.terminate()
        for proc, _, _ in procs.values():
            proc.join(5)
            if proc.exitcode is None:
                proc.kill()
        for s, handler in old.items():
            signal.signal(s, handler)
    return status, message


# -- owner and client side ----------------------------------------------------------------------


class NodesMesh(Mesh):
    """The parties at the topology's control addresses, as the model owner or as a client.

    A client's mesh is one job on the published ``model``: it queues at the first party, then
    presents that party's ticket to the others (:class:`PartyServer`). Each party's identity is
    checked against the topology.
    """

    backend = "nodes"
    remote_compile = True

    def __init__(self, topology: Topology, role: str = CLIENT, name: str | None = None, model: str | None = None):
        topology.require_separate_domains()
        self.topology = topology
        self.world_size = topology.world_size
        self.channels: list[wire.Channel | None] = []
        self.pids: list[int] = []
        self.greetings: list[dict] = []  # each party's signed greeting: who it is, which run
        tls = topology.require_tls()
        if role == OWNER:
            name = topology.owner
            cert, key = tls.owner(name)
        else:
            name = name or topology.clients[0]
            cert, key = tls.client(name)
            if model is None:
                raise PumaError(
                    "on nodes the parties serve published models: puma owner publish -m MODEL -c TOPOLOGY -o "
                    "manifest.json, then run with --model manifest.json"
                )
        certs.check(cert, key, tls.ca, f"{role} {name}")
        self.context = certs.client_context(cert, key, tls.ca)
        self.role, self.name, self.model = role, name, model
        deadline = time.monotonic() + topology.connect_timeout_s
        while True:
            try:
                hello = self._open(role)
                break
            except commands.Retry as err:  # a party restarts to open its links anew: try again
                self.close()
                if time.monotonic() >= deadline:
                    raise PumaError(f"{err} (retried for {topology.connect_timeout_s:.0f} s)") from None
                progress.status("%s; trying again", err)
                time.sleep(1.0)
            except BaseException:
                self.close()
                raise
        try:
            self.server_pids = [h["server_pid"] for h in hello]
            self.hosts = [(h["host"], h["available"]) for h in hello]
            self.heaps = [bool(h.get("heap_kept")) for h in hello]
        except BaseException:
            self.close()
            raise

    def _open(self, role: str) -> list[dict]:
        """Connect and greet every party; a client then queues at the first party and takes its
        ticket to the others. The parties' greetings."""
        self.channels = [self._connect(spec) for spec in self.topology.served]
        hello = [self._hello(rank) for rank in range(len(self.channels))]
        self.pids = [h["pid"] for h in hello]
        self.greetings = [h["greeting"] for h in hello]
        if role == CLIENT:
            ticket = self._job(0, None)
            for rank in range(1, len(self.channels)):
                self._job(rank, ticket)
        return hello

    def _party(self, rank: int) -> str:
        spec = self.topology.parties[rank]
        return f"party {spec.id} (rank {rank})"

    def _connect(self, spec: PartySpec) -> wire.Channel:
        host, port = spec.control_host_port
        deadline = time.monotonic() + self.topology.connect_timeout_s
        waiting = False
        while True:
            try:
                channel = wire.connect(host, port, self.context, timeout=5.0)
            except wire.HandshakeFailed as err:
                raise PumaError(
                    f"party {spec.id} at {spec.control} did not complete the TLS handshake ({first_line(err)}): "
                    "its certificates and this one's come from different runs of puma node certs"
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
                continue
            if channel.peer != certs.Identity("party", spec.id):
                channel.close()
                raise PumaError(f"{spec.control} answered as {channel.peer.describe()}, not as party {spec.id}")
            return channel

    def _exchange(self, rank: int, message: Message, reply: str):
        try:
            return self._exchanged(rank, message, reply)
        except (wire.ChannelClosed, MessageError) as err:
            raise PumaError(f"{self._party(rank)} died or dropped the connection ({first_line(err)})") from err

    def _exchanged(self, rank: int, message: Message, reply: str):
        channel = self.channels[rank]
        with channel.lock:
            channel.send(message)
            answer = channel.recv()
            while answer.op == "queued":
                progress.status(
                    "queued at %s: position %s (waited %s s)",
                    self._party(rank),
                    answer.args.get("position"),
                    answer.args.get("waited_s"),
                )
                answer = channel.recv()
        try:
            return commands.decode_reply(reply, answer)
        except (commands.Retry, commands.JobEnded):
            raise
        except PumaError as err:
            raise PumaError(f"{self._party(rank)}: {err}" if not str(err).startswith("party ") else str(err))

    def _hello(self, rank: int) -> dict:
        protocol = self.topology.protocol
        args = {"protocol": {"protocol": protocol.protocol, "field": protocol.field}, "world_size": self.world_size}
        return self._exchange(rank, commands.encode("hello", {**args, "rank": rank}), "json")

    def _job(self, rank: int, ticket: dict | None) -> dict:
        job = {"model": self.model, "ticket": ticket, "peers": self.greetings}
        return self._exchange(rank, Message("job", job), "json")

    @staticmethod
    def frames(command: str, per_party: list[dict]) -> list:
        """Each party's frame of ``command``; ``per_party`` is emptied as they are made (shares
        are freed once encoded)."""
        frames = []
        while per_party:
            frames.append(commands.encode(command, per_party.pop(0)))
        return frames

    def call(self, command: str, per_party: list[dict]) -> list:
        reply = commands.COMMANDS[command].reply
        frames = self.frames(command, per_party)

        def exchange(rank: int):
            return self._exchange(rank, frames[rank], reply)

        return fan_out(
            [lambda rank=rank: exchange(rank) for rank in range(len(frames))],
            [self._party(rank) for rank in range(len(frames))],
            f"answer {command!r}",
            explain=lambda err: f"died or dropped the connection ({first_line(err)})",
        )

    def broadcast(self, command: str, **kwargs) -> list:
        """:meth:`call` with the same arguments for every party this mesh reaches (in
        client-server mode the owner reaches its own party only)."""
        return self.call(command, [dict(kwargs) for _ in self.topology.served])

    def close(self) -> None:
        """Say goodbye to every party. A channel a failed fan-out's thread still waits on (the
        first failure ends the wait, :func:`fan_out`) is shut underneath first, so that thread
        ends before the connection is closed: two threads on one TLS connection crash."""
        for channel in self.channels:
            if channel is None:
                continue
            idle = channel.lock.acquire(timeout=0.5)
            if idle:
                try:
                    channel.settimeout(5.0)
                    channel.send(commands.encode("close", {}))
                    channel.recv()
                except (wire.ChannelClosed, MessageError, OSError):
                    pass
            else:
                channel.abort()
                idle = channel.lock.acquire(timeout=30.0)
            if idle:
                channel.close()
                channel.lock.release()
            else:
                log.warning("a thread still uses the connection to %s: left open", channel.peer.describe())
        self.channels = []


def open_mesh(request) -> NodesMesh:
    """The nodes backend's mesh for a :class:`puma.runtime.MeshRequest`: a client's job (in
    client-server mode with the client's own party in this process)."""
    if request.topology.client_server:
        from puma.runtime.client_server import ClientServerMesh

        return ClientServerMesh(request.topology, request.identity, request.model)
    return NodesMesh(request.topology, CLIENT, request.identity, request.model)
