"""Test helpers: topology files on free ports and local party processes (``puma node up``)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import numpy as np
import yaml

from puma.runtime.children import parent_death_signal
from puma.runtime.local import (  # noqa: F401 (re-exported)
    client_server_topology,
    descendants,
    free_ports,
    owner_serving,
    stop,
    wait_for_ready,
    write_topology,
)


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
        preexec_fn=parent_death_signal,
    )
    try:
        wait_for_ready(proc, os.path.join(log_dir, "node-up.stderr"))
        yield proc
    finally:
        stop(proc)
        stderr.close()


def _processes_mentioning(fragments: list[str]) -> list[int]:
    """Pids of processes whose command line contains any of ``fragments``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(fragment in cmdline for fragment in fragments):
            found.append(int(entry))
    return found


@contextlib.contextmanager
def token_ray_head(saved: bool = False):
    """A Ray head (``ray start --head``) with token authentication, hermetic: its own HOME and
    temp folder (short: Ray's socket paths must fit 107 bytes), its token in its environment or,
    with ``saved``, only in its HOME's ``.ray/auth_token``. Yields ``(address, token, saved
    token path)``; afterwards every process of it is killed and checked gone (only this
    cluster's: ``ray stop`` would stop every cluster of the user)."""
    import secrets
    import shutil
    import tempfile

    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_cli is None:
        import pytest

        pytest.skip("the ray command is not installed")
    root = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    home = os.path.join(root, "home")
    os.makedirs(home)
    token = secrets.token_hex(32)
    port, client_port, dashboard_port = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=home, RAY_AUTH_MODE="token")
    saved_path = os.path.join(home, ".ray", "auth_token")
    if saved:
        os.makedirs(os.path.dirname(saved_path))
        with open(saved_path, "w") as f:
            f.write(token)
    else:
        env["RAY_AUTH_TOKEN"] = token
    command = [ray_cli, "start", "--head", f"--port={port}", f"--temp-dir={root}/ray"]
    command += [f"--ray-client-server-port={client_port}", f"--dashboard-port={dashboard_port}"]  # ephemeral
    # ports: never in Ray's worker range (10002-19999)
    command += ["--include-dashboard=false", "--disable-usage-stats", "--num-cpus=1"]
    try:
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", token, saved_path
    finally:
        started = _processes_mentioning([root, f":{port} ", f"={port} "])
        started += [child for pid in started for child in descendants(pid)]
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        left = wait_gone(started)
        shutil.rmtree(root, ignore_errors=True)
        assert left == [], f"Ray processes left behind: {left}"


#: Largest |logit| difference between a job the parties serve (ABY3 FM64/18) and plaintext with
#: the same approximation set, on llama-debug's logits (|logit| <= 0.36): measured 6.6e-5 ..
#: 9.9e-5 over 3 runs; a party with another model's or stale shares is off by orders more.
SERVED_LOGITS_ATOL = 5e-4

_PLAINTEXT: dict = {}


def plaintext_logits(source: str, ids: list[list[int]], approx: str = "puma-fast") -> np.ndarray:
    """``source``'s plaintext logits for ``ids`` with ``approx`` (once per session)."""
    from puma.api import SecureModel

    key = (source, approx, tuple(map(tuple, ids)))
    if key not in _PLAINTEXT:
        _PLAINTEXT[key] = np.asarray(SecureModel.from_pretrained(source, approx=approx).logits(ids).outputs)
    return _PLAINTEXT[key]


def assert_serves_published(m, source: str, ids: list[list[int]], approx: str = "puma-fast") -> None:
    """The job ``m`` opened at the parties serves ``source`` as its owner published it: the job is
    for ``source``'s model id, and the shares the parties compute with give plaintext's logits at
    every position of ``ids`` (within :data:`SERVED_LOGITS_ATOL`; one run, no decode)."""
    from puma import deploy

    assert m.session.published == deploy.model_id(source), f"the job opened {m.session.published}"
    expected = plaintext_logits(source, ids, approx)
    served = np.asarray(m.logits(ids).outputs)
    err = float(np.max(np.abs(served - expected)))
    assert err <= SERVED_LOGITS_ATOL, f"served logits differ from the published model's plaintext by {err:.3g}"
