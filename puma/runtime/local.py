"""Parties on this machine for tests, benchmarks and fault drills: free ports, a topology file
for them, and the ``puma node up`` / ``puma node start`` processes that serve it (or, in
client-server mode, the ``puma owner serve`` process).

:class:`LocalParties` starts the parties in one of the two layouts a deployment uses — ``up``
(one supervisor for every party, as on one host) or ``start`` (one supervisor per party, as on
one host each) — waits for their ready line, and stops them (SIGKILL on the supervisors: their
party servers and job processes end with them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import yaml

from puma.runtime.children import parent_death_signal


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports free on 127.0.0.1 right now."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_topology(
    path,
    protocol: str = "aby3",
    world: int = 3,
    connect_s: float = 5,
    recv_s: float = 10,
    tls: dict | None = None,
    ports: list[int] | None = None,
    certificates: bool = True,
    queue_s: float | None = None,
    job_idle_s: float | None = None,
    **extra,
) -> str:
    """A topology file at ``path`` for ``world`` parties on 127.0.0.1 (link ports first, then
    control ports), its certificates in ``certs/`` beside it (``tls``: another folder; made
    unless ``certificates`` is false), its parties' stores in ``store/``; returns its path."""
    ports = ports or free_ports(2 * world)
    doc = {
        "protocol": protocol,
        "timeouts": {
            "connect_s": connect_s,
            "recv_s": recv_s,
            **({"queue_s": queue_s} if queue_s else {}),
            **({"job_idle_s": job_idle_s} if job_idle_s else {}),
        },
        "parties": [
            {"id": f"p{r}", "link": f"127.0.0.1:{ports[r]}", "control": f"127.0.0.1:{ports[world + r]}"}
            for r in range(world)
        ],
        **extra,
    }
    doc["tls"] = tls or {"dir": "certs"}
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    if certificates:
        from puma.runtime import certs

        certs.make(str(path), force=True)
    return str(path)


def stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """End a supervisor process: SIGTERM (it stops its parties cleanly), SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/task/{current}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            children = []
        found += children
        todo += children
    return found


def wait_for_ready(proc: subprocess.Popen, stderr_path: str, timeout: float = 60.0) -> str:
    """Wait for the ``puma: ready:`` line a ``node up``/``node start`` process ``proc`` prints to
    ``stderr_path``; that line. ``RuntimeError`` if the process ends first, ``TimeoutError``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(stderr_path) as f:
            for line in f:
                if line.startswith("puma: ready: "):
                    return line.strip()
        if proc.poll() is not None:
            raise RuntimeError(f"the parties exited ({proc.returncode}): {open(stderr_path).read()[-500:]}")
        time.sleep(0.2)
    raise TimeoutError(f"no ready line in {stderr_path} within {timeout:.0f} s")


class LocalParties:
    """The parties of ``topology`` as local processes, in layout ``up`` or ``start``."""

    def __init__(self, topology: str, log_dir: str, layout: str = "up", world: int = 3, env: dict | None = None):
        if layout not in ("up", "start"):
            raise ValueError(f"layout {layout!r}: use 'up' or 'start'")
        self.topology, self.log_dir, self.layout, self.world = topology, log_dir, layout, world
        self.env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.procs: dict[int, subprocess.Popen] = {}  # supervisor per rank (the same one for every rank in "up")
        os.makedirs(log_dir, exist_ok=True)

    def _stderr(self, key) -> str:
        return os.path.join(self.log_dir, f"node-{key}.stderr")

    def _launch(self, ranks: list[int]) -> subprocess.Popen:
        key = "up" if self.layout == "up" else f"rank{ranks[0]}"
        command = ["node", "up"] if self.layout == "up" else ["node", "start", "--rank", str(ranks[0])]
        with open(self._stderr(key), "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "puma.cli", *command, "-c", self.topology, "--log-dir", self.log_dir],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=self.env,
                preexec_fn=parent_death_signal,
            )
        wait_for_ready(proc, self._stderr(key))
        for rank in ranks:
            self.procs[rank] = proc
        return proc

    def start(self) -> "LocalParties":
        if self.layout == "up":
            self._launch(list(range(self.world)))
        else:
            for rank in range(self.world):
                self._launch([rank])
        return self

    def restart(self, rank: int) -> None:
        """Bring party ``rank`` back after its supervisor died (in ``up``: every party)."""
        if self.layout == "up":
            self.stop()
            self.start()
        else:
            self._kill(self.procs[rank])
            self._launch([rank])

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs.values())

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def stop(self) -> None:
        for proc in set(self.procs.values()):
            self._kill(proc)
        self.procs = {}

    def __enter__(self) -> "LocalParties":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def client_server_topology(path, job_idle_s: float = 300, clients=("client",), recv_s: float = 30) -> str:
    """A client-server topology at ``path`` (cheetah; the owner's party ``provider`` with link
    and control ports, the client's party ``customer`` with a link only) and its certificates.
    ``recv_s``: how long a party waits for the other's message (a homomorphic product of a big
    model's one-hot embedding keeps one party computing for minutes)."""
    link0, control0, link1 = free_ports(3)
    doc = {
        "mode": "client-server",
        "protocol": "cheetah",
        "timeouts": {"connect_s": 10, "recv_s": recv_s, "job_idle_s": job_idle_s},
        "tls": {"dir": "certs"},
        "clients": list(clients),
        "parties": [
            {"id": "provider", "link": f"127.0.0.1:{link0}", "control": f"127.0.0.1:{control0}"},
            {"id": "customer", "link": f"127.0.0.1:{link1}"},
        ],
    }
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    from puma.runtime import certs

    certs.make(str(path), force=True)
    return str(path)


@contextlib.contextmanager
def owner_serving(topology_path: str, model: str, manifest: str, log_dir: str, ready_s: float = 120):
    """``puma owner serve`` as a subprocess: yields it once the model is published and served
    (its ``puma: serving`` line, within ``ready_s``: a hang guard for calibration, start and
    publishing); stopped with its party however the caller ends (SIGKILL for any left)."""
    err_path = os.path.join(log_dir, "owner-serve.stderr")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "puma.cli", "owner", "serve", "-m", model, "-c", topology_path, "-o", manifest]
            + ["--log-dir", log_dir],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            preexec_fn=parent_death_signal,
        )
    started = [proc.pid]
    try:
        deadline = time.monotonic() + ready_s
        while "puma: serving" not in open(err_path).read():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"puma owner serve did not serve: {open(err_path).read()[-800:]}")
            time.sleep(0.3)
        started += descendants(proc.pid)
        yield proc
    finally:
        started += descendants(proc.pid)
        stop(proc)
        for pid in started:  # the party and its job processes end with the supervisor; make sure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
