"""Test helpers: topology files on free ports and local party processes (``puma node up``)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import yaml

from puma.runtime.local import descendants, free_ports, wait_for_ready, write_topology  # noqa: F401 (re-exported)


def control_ports(topology_path: str) -> list[int]:
    with open(topology_path) as f:
        doc = yaml.safe_load(f)
    return [int(p["control"].rsplit(":", 1)[1]) for p in doc["parties"]]


def alive(pids: list[int]) -> list[int]:
    """The pids of ``pids`` that still run (zombies count as gone)."""
    living = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    living.append(pid)
        except OSError:
            pass
    return living


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Wait until ``pids`` have ended; the ones still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def wait_for_ports(ports: list[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"party control port {port} did not open")
                time.sleep(0.2)


@contextlib.contextmanager
def local_parties(topology_path: str, log_dir: str, env: dict | None = None):
    """``puma node up`` on ``topology_path`` as a subprocess (environment ``env``, default this
    one's); yields it once every party listens."""
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    stderr = open(os.path.join(log_dir, "node-up.stderr"), "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "puma.cli", "node", "up", "-c", topology_path, "--log-dir", log_dir],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env=env,
    )
    try:
        wait_for_ready(proc, os.path.join(log_dir, "node-up.stderr"))
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        stderr.close()
