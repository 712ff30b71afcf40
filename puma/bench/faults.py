"""Deployment drills for the ``nodes`` backend: a fault matrix and a soak, written as JSON.

**Fault matrix.** For each layout (``up``: one supervisor for all parties; ``start``: one per
party, as on separate hosts), each rank and each phase of a client's job on a published model,
one party is killed at that moment and the client's error is recorded: how long after the kill
it came, its text (one line?), and whether the parties then served the next job. Phases:

- ``connect``: the party's supervisor (its host) is killed before the client connects; it is
  started again before the next job;
- ``upload``: the party's process is killed as the client's input shares are delivered;
- ``run``: the party's process is killed as a program is started;
- ``collect``: the party's process is killed as output shares are collected.

In the last three the supervisors start the dead party again by themselves (and the survivors
whose links broke). Plus a link port held by another process when a party starts, and a second
client while a job runs (it queues, then gives up after ``queue_s``). A case passes when the
error is one line naming the party or the cause within ``connect_s + recv_s + 10`` seconds and
the next job succeeds within ``2 (connect_s + recv_s) + 20``.

**Soak.** ``jobs`` consecutive small jobs on the same parties; each party process's RSS and open
file descriptors after the warm-up and at the end (the processes serve every job; the model's
shares stay resident).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import time

from puma.api import SecureModel
from puma.bench.report import CellStore
from puma.errors import PumaError
from puma.runtime.local import LocalParties, write_topology
from puma.runtime.nodes import NodesMesh

PRESET = "llama-debug"
PHASES = ("connect", "upload", "run", "collect")
LAYOUTS = ("up", "start")
CONNECT_S, RECV_S, QUEUE_S = 5.0, 6.0, 3.0
IDS = [[5, 6, 7, 8]]


@contextlib.contextmanager
def _kill_on(command: str, victim):
    """Kill ``victim()``'s process the first time the client gives ``command``."""
    original = NodesMesh.call
    fired: dict = {}

    def patched(self, name, *args, **kwargs):
        if name == command and not fired:
            os.kill(victim(self), signal.SIGKILL)
            fired["at"] = time.monotonic()
        return original(self, name, *args, **kwargs)

    NodesMesh.call = patched
    try:
        yield fired
    finally:
        NodesMesh.call = original


def _job(topology: str) -> list[int]:
    with SecureModel.from_pretrained(PRESET, approx="puma-fast", backend="nodes", config=topology) as m:
        return m.generate_ids(IDS, 2).tokens[0]


def _next_job(topology: str) -> dict:
    """The next job on the same parties, retried while the parties whose links broke are being
    started again (within 2 (connect_s + recv_s) + 20 s)."""
    start = time.monotonic()
    deadline = start + 2 * (CONNECT_S + RECV_S) + 20
    while True:
        try:
            tokens = _job(topology)
            return {"served_next_job": len(tokens) == 2, "next_job_s": round(time.monotonic() - start, 2)}
        except PumaError as err:
            if time.monotonic() >= deadline:
                return {"served_next_job": False, "next_job_error": str(err)}
            time.sleep(1.0)


def _server_pids(topology: str) -> list[int]:
    """The party processes' pids (asked as the owner: no job needed)."""
    from puma.runtime.config import Topology
    from puma.runtime.nodes import OWNER

    mesh = NodesMesh(Topology.from_yaml(topology), OWNER)
    try:
        return list(mesh.server_pids)
    finally:
        mesh.close()


def _case(layout: str, rank: int, phase: str, folder: str) -> dict:
    topology = write_topology(os.path.join(folder, "t.yaml"), connect_s=CONNECT_S, recv_s=RECV_S)
    cell = {"layout": layout, "rank": rank, "phase": phase}
    with LocalParties(topology, os.path.join(folder, "logs"), layout) as parties:
        _job(topology)  # published, warm
        kill_at = None
        try:
            if phase == "connect":
                LocalParties._kill(parties.procs[rank])
                kill_at = time.monotonic()
                _job(topology)
            else:
                command = {"upload": "inputs", "run": "run_task", "collect": "outputs"}[phase]
                with _kill_on(command, lambda mesh: mesh.pids[rank]) as fired:
                    try:
                        _job(topology)
                    finally:
                        kill_at = fired.get("at")
            cell["error"] = None
        except PumaError as err:
            cell["error"] = str(err)
        cell["error_s"] = round(time.monotonic() - kill_at, 2) if kill_at else None
        cell["one_line"] = bool(cell["error"]) and "\n" not in cell["error"]
        if phase == "connect":
            time.sleep(0.5)
            parties.restart(rank)
        cell["supervisors_alive"] = parties.alive()
        cell.update(_next_job(topology))
    limit = CONNECT_S + RECV_S + 10
    cell["passed"] = (
        bool(cell["error"] and cell["one_line"] and cell["error_s"] is not None and cell["error_s"] <= limit)
        and cell["served_next_job"]
    )
    return cell


def _port_clash(folder: str) -> dict:
    topology = write_topology(os.path.join(folder, "t.yaml"), connect_s=CONNECT_S, recv_s=RECV_S)
    import yaml

    with open(topology) as f:
        link = yaml.safe_load(f)["parties"][1]["link"]
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", int(link.rsplit(":", 1)[1])))
    holder.listen(1)
    start = time.monotonic()
    try:
        LocalParties(topology, os.path.join(folder, "logs"), "up").start()
        return {"case": "link port in use", "error": None, "passed": False}
    except RuntimeError as err:
        message = [ln for ln in str(err).splitlines() if ln.startswith("puma: error:")]
        return {
            "case": "link port in use",
            "error": message[0] if message else str(err)[-300:],
            "error_s": round(time.monotonic() - start, 2),
            "passed": bool(message) and "link port" in message[0],
        }
    finally:
        holder.close()


def _busy(folder: str) -> dict:
    topology = write_topology(os.path.join(folder, "t.yaml"), connect_s=CONNECT_S, recv_s=RECV_S, queue_s=QUEUE_S)
    with LocalParties(topology, os.path.join(folder, "logs"), "up"):
        first = SecureModel.from_pretrained(PRESET, approx="puma-fast", backend="nodes", config=topology)
        start = time.monotonic()
        try:
            _job(topology)
            error = None
        except PumaError as err:
            error = str(err)
        seconds = round(time.monotonic() - start, 2)
        first.close()
        cell = {"case": "second client while a job runs", "error": error, "error_s": seconds}
        cell.update(_next_job(topology))
    cell["passed"] = bool(error and "in the queue" in error) and cell["served_next_job"]
    return cell


def _proc_stats(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return {"rss": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def soak(folder: str, jobs: int = 50, warmup: int = 5) -> dict:
    topology = write_topology(os.path.join(folder, "t.yaml"), connect_s=CONNECT_S, recv_s=RECV_S)
    with LocalParties(topology, os.path.join(folder, "logs"), "up"):
        servers = _server_pids(topology)
        seconds, peaks = [], []
        start_stats = None
        for k in range(jobs):
            if k == warmup:
                start_stats = [_proc_stats(pid) for pid in servers]
            begin = time.monotonic()
            with SecureModel.from_pretrained(PRESET, approx="puma-fast", backend="nodes", config=topology) as m:
                result = m.generate_ids(IDS, 2)
            seconds.append(round(time.monotonic() - begin, 2))
            peaks.append(result.cost.to_dict()["peak_rss"]["parties"])
        end_stats = [_proc_stats(pid) for pid in servers]
    growth = [e["rss"] / s["rss"] - 1.0 for s, e in zip(start_stats, end_stats)]
    return {
        "jobs": jobs,
        "warmup": warmup,
        "job_s": {"first": seconds[0], "median": sorted(seconds)[len(seconds) // 2], "last": seconds[-1]},
        "servers_after_warmup": start_stats,
        "servers_at_end": end_stats,
        "server_rss_growth": [round(g, 4) for g in growth],
        "fd_growth": [e["fds"] - s["fds"] for s, e in zip(start_stats, end_stats)],
        "party_peak_rss": {"first": peaks[0], "last": peaks[-1]},
        "passed": all(g < 0.10 for g in growth) and all(e["fds"] <= s["fds"] for s, e in zip(start_stats, end_stats)),
    }


def run(out: str = "bench-results/faults.json", jobs: int = 50, resume: bool = True) -> dict:
    """The fault matrix and the soak (resumable per case)."""
    store = CellStore(out, {"preset": PRESET, "connect_s": CONNECT_S, "recv_s": RECV_S, "jobs": jobs}, resume=resume)
    for layout in LAYOUTS:
        for rank in range(3):
            for phase in PHASES:
                with tempfile.TemporaryDirectory() as folder:
                    store.measure(f"matrix/{layout}/{rank}/{phase}", lambda: _case(layout, rank, phase, folder))
    with tempfile.TemporaryDirectory() as folder:
        store.measure("port-clash", lambda: _port_clash(folder))
    with tempfile.TemporaryDirectory() as folder:
        store.measure("busy", lambda: _busy(folder))
    with tempfile.TemporaryDirectory() as folder:
        store.measure("soak", lambda: soak(folder, jobs))
    return store.data


def add_arguments(p) -> None:
    p.add_argument("--jobs", type=int, default=50, help="jobs of the soak (default: %(default)s)")


def main(args) -> dict:
    return run(args.out, args.jobs, resume=args.resume)


def markdown(result: dict) -> str:
    cells = result["cells"]
    lines = [
        f"Fault matrix ({PRESET}, nodes, connect_s {result['config']['connect_s']:g}, "
        f"recv_s {result['config']['recv_s']:g}): one party killed per case.",
        "",
        "| layout | rank | phase | error after s | one line | next job | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, c in cells.items():
        if key.startswith("matrix/"):
            error = (c["error"] or "none").replace("|", "/")[:110]
            lines.append(
                f"| {c['layout']} | {c['rank']} | {c['phase']} | {c['error_s']} | {'yes' if c['one_line'] else 'no'} | "
                f"{'served' if c['served_next_job'] else 'FAILED'} | {error} |"
            )
    for key in ("port-clash", "busy"):
        if key in cells:
            c = cells[key]
            lines.append(f"\n- {c['case']}: {c.get('error')} ({c.get('error_s')} s); passed: {c['passed']}")
    if "soak" in cells:
        s = cells["soak"]
        lines.append(
            f"- soak: {s['jobs']} jobs, median {s['job_s']['median']} s; server RSS growth after warm-up "
            f"{', '.join(f'{100 * g:+.1f}%' for g in s['server_rss_growth'])}; fd growth {s['fd_growth']}; "
            f"passed: {s['passed']}"
        )
    return "\n".join(lines)
