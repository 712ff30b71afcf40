"""The network time model checked for real: parties in Linux network namespaces with rate limits.

Each party runs (``puma node start --rank r``) in its own namespace ``puma-p<r>``, joined to a
bridge in the driver's namespace by a veth pair; ``tc tbf`` limits every party's egress to
``rate`` (``netem`` delay is not available on these machines, so only the bandwidth term of
:mod:`puma.network` is checked). A model runs once unlimited and once limited, in the same
namespaces; the model's prediction for the limited run is the unlimited run's seconds plus the
busiest party's bytes / rate plus its send actions x the namespaces' round trip (tens of µs).
Needs root (``ip netns``); everything made is removed afterwards, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time

import yaml

from puma.errors import PumaError
from puma.runtime.children import parent_death_signal
from puma.runtime.local import wait_for_ready

BRIDGE = "pumabr0"
SUBNET = "10.77.0"
LINK_PORT, CONTROL_PORT = 61800, 61810


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    probe = "puma-probe"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (OSError, subprocess.CalledProcessError) as err:
        return f"ip netns is not permitted here ({err})"
    return None


def teardown(world: int = 3) -> None:
    for r in range(world):
        subprocess.run(["ip", "netns", "del", f"puma-p{r}"], capture_output=True)
        subprocess.run(["ip", "link", "del", f"puma-v{r}b"], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def setup(world: int = 3, rate: str | None = None) -> None:
    """Namespaces ``puma-p<r>`` at ``SUBNET.<r+1>``, the bridge at ``SUBNET.254``; ``rate``
    (tc syntax, e.g. ``200mbit``) limits each party's egress, None leaves it unlimited."""
    teardown(world)
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for r in range(world):
        ns, veth = f"puma-p{r}", f"puma-v{r}"
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", veth + "b")
        _ip("link", "set", veth, "netns", ns)
        _ip("link", "set", veth + "b", "master", BRIDGE, "up")
        _ip("-n", ns, "addr", "add", f"{SUBNET}.{r + 1}/24", "dev", veth)
        _ip("-n", ns, "link", "set", veth, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        if rate:
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    veth,
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    "256kb",
                    "latency",
                    "100ms",
                ],
                check=True,
                capture_output=True,
            )


def topology(path: str, world: int = 3, recv_s: float = 120) -> str:
    doc = {
        "protocol": "aby3",
        "timeouts": {"connect_s": 30, "recv_s": recv_s},
        "parties": [
            {"id": f"p{r}", "link": f"{SUBNET}.{r + 1}:{LINK_PORT}", "control": f"{SUBNET}.{r + 1}:{CONTROL_PORT}"}
            for r in range(world)
        ],
        "tls": {"dir": "certs"},
    }
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    from puma.runtime import certs

    certs.make(path, force=True)  # the parties are on a network: mutual TLS with their own identities
    return path


@contextlib.contextmanager
def parties(topology_path: str, log_dir: str, world: int = 3):
    """``puma node start`` for each rank inside its namespace; stopped (SIGKILL) on the way out."""
    procs = []
    try:
        for r in range(world):
            err = open(os.path.join(log_dir, f"ns-party{r}.stderr"), "w")
            procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        f"puma-p{r}",
                        sys.executable,
                        "-m",
                        "puma.cli",
                        "node",
                        "start",
                        "-c",
                        topology_path,
                        "--rank",
                        str(r),
                        "--log-dir",
                        log_dir,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    preexec_fn=parent_death_signal,
                )
            )
        deadline = time.monotonic() + 90
        for r in range(world):
            try:
                wait_for_ready(procs[r], os.path.join(log_dir, f"ns-party{r}.stderr"), deadline - time.monotonic())
            except (RuntimeError, TimeoutError) as err:
                raise PumaError(f"party {r} in its namespace did not start: {err}") from err
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def measure(preset: str, size, approx: str, rate: str | None, overrides: dict, folder: str) -> dict:
    from puma.bench.costs import run_once

    setup(rate=rate)
    try:
        topo = topology(os.path.join(folder, "ns.yaml"))
        with parties(topo, folder):
            return run_once(preset, size, approx, "nodes", overrides, {"weights": "resident"}, {"config": topo})
    finally:
        teardown()


def validate(preset: str = "bert-base", size=128, approx: str = "puma-fast", rate_mbit: int = 200, layers: int = 2):
    """The unlimited and the limited run, and the model's error on the limited one."""
    from puma import network
    from puma.bench.costs import presets

    reason = available()
    if reason:
        raise PumaError(f"network namespaces: {reason}")
    overrides = {presets()[preset][1].FIELDS["num_layers"]: layers}
    with tempfile.TemporaryDirectory() as folder:
        free = measure(preset, size, approx, None, overrides, folder)
        limited = measure(preset, size, approx, f"{rate_mbit}mbit", overrides, folder)
    link = network.Network("tbf", rate_mbit * 1e6, 60e-6)
    predicted = network.estimate(free["run_s"], free["max_party_send_actions"], network.busiest_bytes(free), link)
    return {
        "preset": preset,
        "size": size,
        "layers": layers,
        "approx": approx,
        "rate_mbit": rate_mbit,
        "unlimited_s": free["run_s"],
        "limited_s": limited["run_s"],
        "busiest_bytes": network.busiest_bytes(free),
        "predicted_s": round(predicted, 2),
        "error": round(predicted / limited["run_s"] - 1.0, 4),
        "within_15_percent": abs(predicted / limited["run_s"] - 1.0) <= 0.15,
        "load": {"unlimited": free.get("load"), "limited": limited.get("load")},
    }


def add_arguments(p) -> None:
    p.add_argument("--preset", default="bert-base", help="model preset (default: %(default)s)")
    p.add_argument("--size", type=int, default=128, help="tokens (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="layers of the cut model (default: %(default)s)")
    p.add_argument("--rate-mbit", type=int, default=200, help="each party's egress limit (default: %(default)s)")
    p.add_argument("--approx", default="puma-fast", help="approximation set (default: %(default)s)")


def main(args) -> dict:
    """Needs root (namespaces, tc): unlimited then rate-limited runs, the model's prediction beside."""
    import json

    from puma.bench.report import environment
    from puma.errors import PumaError

    reason = available()
    if reason:
        raise PumaError(f"network namespaces are not available here: {reason}")
    result = validate(args.preset, args.size, args.approx, args.rate_mbit, args.layers)
    data = {"environment": environment(), "result": result}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    return data


def markdown(data: dict) -> str:
    r = data["result"]
    return (
        f"{r['preset']} ({r['layers']} layers) at {r['size']} tokens, {r['approx']}, nodes with each party "
        f"in its own network namespace: unlimited {r['unlimited_s']:.1f} s; every party's egress limited "
        f"to {r['rate_mbit']} Mbit/s by tc tbf: {r['limited_s']:.1f} s measured, {r['predicted_s']:.1f} s "
        f"modelled (unlimited seconds + the busiest party's {r['busiest_bytes'] / 1e6:.0f} MB / rate): "
        f"error {100 * r['error']:+.1f}% ({'within' if r['within_15_percent'] else 'outside'} 15%)."
    )
