"""Failures of the nodes backend end in one clear error, in bounded time, with a non-zero exit.

Covered: a party that never starts, a party killed mid-run (driver, supervisor and surviving
parties, which serve the next job), a second driver while a job runs, a control port in use,
malformed topologies, a job for another protocol, a protocol whose party count does not match
the topology, and TLS on the links (certificates made by ``puma node certs``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from puma import cli
from puma.api import SecureModel
from puma.errors import PumaError
from tests.parties import (
    control_ports,
    descendants,
    free_ports,
    local_parties,
    token_ray_head,
    wait_for_ports,
    wait_gone,
    write_topology,
)

PRESET = "llama-debug"


def _one_error_line(err: str, *fragments):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("puma: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def _start_party(topology, rank, log_dir):
    log = open(os.path.join(log_dir, f"party{rank}.stderr"), "w")
    return subprocess.Popen(
        [sys.executable, "-m", "puma.cli", "node", "start", "-c", topology, "--rank", str(rank), "--log-dir", log_dir],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


def _stop(*procs):
    """SIGKILL each supervisor, as a crash would: its parties must go with it."""
    started = [pid for p in procs for pid in descendants(p.pid)]
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert wait_gone(started) == [], "party processes outlived their supervisor"


def test_party_that_never_starts(tmp_path, capsys):
    topo = write_topology(tmp_path / "t.yaml", connect_s=3)
    procs = [_start_party(topo, r, str(tmp_path)) for r in (0, 1)]
    try:
        wait_for_ports(control_ports(topo)[:2])
        start = time.monotonic()
        code = cli.main(["generate", "-m", PRESET, "-p", "x", "--backend", "nodes", "-c", topo])
        assert code != 0
        assert time.monotonic() - start < 30
    finally:
        _stop(*procs)
    _one_error_line(capsys.readouterr().err, "p2", "unreachable")


def _ids():
    return [[5, 6, 7, 8]]


def test_party_killed_mid_run(tmp_path):
    """Multi-host layout (``node start`` per party). Kill party 2's job process during a run:
    the driver fails at once naming it; every party server stays up (yacl may exit a survivor's
    job process, never its server), and the same parties serve the next job once the survivors'
    jobs have given up on p2 (within recv_s plus the send-retry budget: the next driver is told
    they are busy until then and waits up to connect_s). Then kill party 2's server: restarted
    alone, it rejoins the others."""
    recv_s = 6
    topo = write_topology(tmp_path / "t.yaml", connect_s=30, recv_s=recv_s)
    procs = {r: _start_party(topo, r, str(tmp_path)) for r in range(3)}
    try:
        wait_for_ports(control_ports(topo))
        m = SecureModel.from_pretrained(PRESET, backend="nodes", config=topo)
        victim = m.session.mesh.pids[2]
        assert victim not in [p.pid for p in procs.values()] and victim != m.session.mesh.server_pids[2]

        def kill_after_first_token(_):
            os.kill(victim, signal.SIGKILL)

        start = time.monotonic()
        with pytest.raises(PumaError, match=r"p2 \(rank 2\) died"):
            m.generate_ids(_ids(), 6, use_cache=False, progress=kill_after_first_token)
        assert time.monotonic() - start < 10
        m.close()
        start = time.monotonic()
        with SecureModel.from_pretrained(PRESET, backend="nodes", config=topo) as m2:
            assert len(m2.generate_ids(_ids(), 2).tokens[0]) == 2
        assert time.monotonic() - start < 2 * recv_s + 15
        assert all(p.poll() is None for p in procs.values()), "a party server ended with its job"

        procs[2].kill()  # party 2's host goes down; only it is restarted
        procs[2].wait(10)
        time.sleep(1)
        procs[2] = _start_party(topo, 2, str(tmp_path))
        wait_for_ports(control_ports(topo))
        with SecureModel.from_pretrained(PRESET, backend="nodes", config=topo) as m3:
            assert len(m3.generate_ids(_ids(), 2).tokens[0]) == 2
        assert procs[0].poll() is None and procs[1].poll() is None
    finally:
        _stop(*procs.values())


def test_second_driver_is_told_the_parties_are_busy(tmp_path):
    """While a job holds the parties, another driver waits up to connect_s and then gets one line
    naming the busy party and who holds it, never a false TLS/auth message; once the first job
    ends the parties serve the next."""
    topo = write_topology(tmp_path / "t.yaml", connect_s=3)
    with local_parties(topo, str(tmp_path)):
        first = SecureModel.from_pretrained(PRESET, backend="nodes", config=topo)
        start = time.monotonic()
        with pytest.raises(PumaError) as err:
            SecureModel.from_pretrained(PRESET, backend="nodes", config=topo)
        assert 3 <= time.monotonic() - start < 15
        message = str(err.value)
        assert "is busy with a job from 127.0.0.1:" in message and "one job at a time" in message, message
        assert "auth_key" not in message and "TLS" not in message
        first.close()
        with SecureModel.from_pretrained(PRESET, backend="nodes", config=topo) as second:
            assert len(second.generate_ids(_ids(), 2).tokens[0]) == 2


def test_supervisor_reports_a_dead_party(tmp_path):
    topo = write_topology(tmp_path / "t.yaml", connect_s=10, recv_s=5)
    with local_parties(topo, str(tmp_path)) as up:
        m = SecureModel.from_pretrained(PRESET, backend="nodes", config=topo)
        os.kill(m.session.mesh.server_pids[1], signal.SIGKILL)  # its job process goes with it
        time.sleep(1)  # the supervisor stops the other parties too: the driver sees them all gone
        with pytest.raises(PumaError, match="died or dropped the connection"):
            m.generate_ids(_ids(), 2)
        m.close()
        assert up.wait(30) != 0
    err = open(tmp_path / "node-up.stderr").read()
    assert "party p1 (rank 1) was killed by SIGKILL" in err


def test_supervisor_killed_takes_its_parties_along(tmp_path):
    topo = write_topology(tmp_path / "t.yaml")
    with local_parties(topo, str(tmp_path)) as up:
        parties = descendants(up.pid)
        assert len(parties) >= 3
        up.kill()
        up.wait(10)
        assert wait_gone(parties) == [], "parties outlived a SIGKILLed node up"
    for port in control_ports(topo):  # the ports are free again
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def _set(key, value):
    return lambda doc: doc.update({key: value})


@pytest.mark.parametrize(
    "change, fragment",
    [
        (_set("timeouts", {"recv_S": 5}), "unknown key 'timeouts.recv_S'; did you mean 'recv_s'?"),
        (_set("timeouts", {"connect_s": -1}), "timeouts.connect_s must be a positive number"),
        (_set("timeouts", {"recv_s": 0}), "timeouts.recv_s must be a positive number"),
        (_set("auth_key", ""), "auth_key is empty"),
        (_set("tls", {"cert": "a", "key": "b", "ca": "c", "kee": "d"}), "unknown key 'tls.kee'"),
        (lambda doc: doc["parties"][1].update({"ctrl": "x"}), "unknown key 'parties[1].ctrl'; did you mean 'control'?"),
        (lambda doc: doc["parties"][2].update({"id": "p0"}), "parties 0 and 2 have the same id 'p0'"),
    ],
)
def test_strict_topology(tmp_path, capsys, change, fragment):
    path = write_topology(tmp_path / "t.yaml")
    with open(path) as f:
        doc = yaml.safe_load(f)
    change(doc)
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    assert cli.main(["node", "up", "-c", path]) != 0
    _one_error_line(capsys.readouterr().err, fragment)


def _start_with_port_taken(topo: str, port: int) -> subprocess.CompletedProcess:
    """``puma node start --rank 0`` while something else listens on ``port``."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen(1)
    try:
        return subprocess.run(
            [sys.executable, "-m", "puma.cli", "node", "start", "-c", topo, "--rank", "0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        blocker.close()


def test_link_port_in_use(tmp_path):
    topo = write_topology(tmp_path / "t.yaml")
    with open(topo) as f:
        port = int(yaml.safe_load(f)["parties"][0]["link"].rsplit(":", 1)[1])
    result = _start_with_port_taken(topo, port)
    assert result.returncode != 0
    _one_error_line(result.stderr, f"link port {port}", "is already in use")


def test_control_port_in_use(tmp_path):
    topo = write_topology(tmp_path / "t.yaml")
    port = control_ports(topo)[0]
    result = _start_with_port_taken(topo, port)
    assert result.returncode != 0
    _one_error_line(result.stderr, f"control port {port} is already in use")


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("protocol: aby3\nparties: [\n", "not valid YAML"),
        ("protocol: aby3\n", "'parties' must be a list"),
        (
            "protocol: aby3\nparties:\n  - {link: '127.0.0.1:1', control: '127.0.0.1:2'}\n",
            "needs 3 parties, the topology lists 1",
        ),
        ("protocol: aby4\nparties: []\n", "'parties' must be a list"),
        ("protocol: rot13\nparties:\n  - {link: 'a:1', control: 'a:2'}\n", "unknown protocol 'rot13'"),
        (
            "parties:\n  - {link: 'nohost', control: '127.0.0.1:2'}\n  - {link: 'a:3', control: 'a:4'}\n"
            "  - {link: 'a:5', control: 'a:6'}\n",
            "'nohost' is not host:port",
        ),
        ("colour: blue\nparties: []\n", "unknown key 'colour'"),
    ],
)
def test_malformed_topology(tmp_path, capsys, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert cli.main(["node", "up", "-c", str(path)]) != 0
    _one_error_line(capsys.readouterr().err, fragment)
    assert cli.main(["generate", "-m", PRESET, "-p", "x", "--backend", "nodes", "-c", str(path)]) != 0
    _one_error_line(capsys.readouterr().err, fragment)


def test_missing_topology_file(capsys):
    assert cli.main(["node", "up", "-c", "/no/such.yaml"]) != 0
    _one_error_line(capsys.readouterr().err, "/no/such.yaml not found")


def test_job_for_another_protocol(tmp_path):
    topo = write_topology(tmp_path / "t.yaml", connect_s=5)
    with local_parties(topo, str(tmp_path)):
        ports = control_ports(topo)
        other = write_topology(tmp_path / "2pc.yaml", protocol="semi2k", world=2, ports=free_ports(2) + ports[:2])
        with pytest.raises(PumaError, match=r"runs aby3/FM64 with 3 parties; the job asked for semi2k/FM64 with 2"):
            SecureModel.from_pretrained(PRESET, backend="nodes", config=other)


def test_protocol_needs_other_party_count(tmp_path, capsys):
    topo = write_topology(tmp_path / "t.yaml")
    assert (
        cli.main(["generate", "-m", PRESET, "-p", "x", "--backend", "nodes", "-c", topo, "--protocol", "semi2k"]) != 0
    )
    _one_error_line(capsys.readouterr().err, "protocol semi2k needs 2 parties", "lists 3")


def test_nodes_backend_without_topology(capsys):
    assert cli.main(["generate", "-m", PRESET, "-p", "x", "--backend", "nodes"]) != 0
    _one_error_line(capsys.readouterr().err, "needs a topology")


def test_node_certs_makes_what_tls_needs(tmp_path, capsys):
    """``puma node certs`` writes the CA and each host's pair at the topology's tls paths (one
    host here), refuses to overwrite them, and the parties then run over mutual TLS; a driver
    without the certificates is refused."""
    pytest.importorskip("cryptography")
    tls = {"cert": "certs/party.crt", "key": "certs/party.key", "ca": "certs/ca.crt"}
    topo = write_topology(tmp_path / "tls.yaml", tls=tls)
    assert cli.main(["node", "certs", "-c", topo]) == 0
    written = capsys.readouterr().out.split()
    assert sorted(os.path.relpath(p, tmp_path) for p in written) == [
        "certs/ca.crt",
        "certs/ca.crt.key",
        "certs/party.crt",
        "certs/party.key",
    ]
    assert oct(os.stat(tmp_path / "certs" / "party.key").st_mode & 0o777) == "0o600"
    assert cli.main(["node", "certs", "-c", topo]) == 1
    _one_error_line(capsys.readouterr().err, "exists: pass --force")
    with local_parties(topo, str(tmp_path)):
        with SecureModel.from_pretrained(PRESET, backend="nodes", config=topo) as m:
            secure = m.generate_ids(_ids(), 3, reveal="logits")
        plain = SecureModel.from_pretrained(PRESET).generate_ids(_ids(), 3)
        assert secure.tokens == plain.tokens
        assert secure.cost.total_bytes_sent > 0
        # a driver without the certificates is refused
        plain_topo = write_topology(tmp_path / "plain.yaml", connect_s=2, ports=free_ports(3) + control_ports(topo))
        with pytest.raises(PumaError, match="p0 .* did not complete the handshake"):
            SecureModel.from_pretrained(PRESET, backend="nodes", config=plain_topo)


def test_unreachable_ray_address_is_one_line_within_connect_s(tmp_path, capsys):
    port = free_ports(1)[0]
    topo = write_topology(tmp_path / "t.yaml", connect_s=2)
    start = time.monotonic()
    args = ["generate", "-m", PRESET, "-p", "x", "--backend", "ray", "-c", topo, "--ray-address", f"127.0.0.1:{port}"]
    assert cli.main(args) != 0
    assert time.monotonic() - start < 20
    _one_error_line(capsys.readouterr().err, f"Ray cluster at 127.0.0.1:{port} is unreachable after 2 s")


def test_parties_in_network_namespaces_serve_a_job(tmp_path):
    """The harness of scripts/netns_bandwidth.py: every party in its own namespace behind a
    rate-limited veth, the driver outside; a job runs across them and everything is removed."""
    from puma.bench import netns

    reason = netns.available()
    if reason:
        pytest.skip(f"network namespaces: {reason}")
    try:
        netns.setup(rate="50mbit")
        topo = netns.topology(str(tmp_path / "ns.yaml"), recv_s=30)
        with netns.parties(topo, str(tmp_path)):
            with SecureModel.from_pretrained(PRESET, backend="nodes", config=topo) as m:
                result = m.generate_ids(_ids(), 2)
        assert len(result.tokens[0]) == 2 and result.cost.total_bytes_sent > 0
    finally:
        netns.teardown()
    assert "puma-p0" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _fake_gcs(token: str):
    """A GCS that answers ``GetClusterId`` only to callers bearing ``token``, as Ray's does under
    token authentication (Ray >= 2.59)."""
    from concurrent import futures

    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    class NodeInfo(gcs_service_pb2_grpc.NodeInfoGcsServiceServicer):
        def GetClusterId(self, request, context):
            if ("authorization", f"Bearer {token}") not in tuple(context.invocation_metadata()):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "Invalid or missing authentication token")
            return gcs_service_pb2.GetClusterIdReply()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    gcs_service_pb2_grpc.add_NodeInfoGcsServiceServicer_to_server(NodeInfo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_ray_token_missing_or_refused_is_one_line_at_once(tmp_path):
    """The command runs in a child process: Ray keeps authentication settings process-wide, so
    a refused token tried here would follow the suite's later Ray sessions."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-token")  # no saved token either
    server, port = _fake_gcs("right-token")
    topo = write_topology(tmp_path / "t.yaml", connect_s=5)
    args = [sys.executable, "-m", "puma.cli", "generate", "-m", PRESET, "--ids", "1,2", "--backend", "ray"]
    args += ["-c", topo, "--ray-address", f"127.0.0.1:{port}"]
    try:
        start = time.monotonic()
        for extra, fragments in (
            ([], ("uses token authentication", "--ray-token")),
            (["--ray-token", "wrong"], ("refused the token given", "ray get-auth-token")),
        ):
            done = subprocess.run(args + extra, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 1, done.stderr
            _one_error_line(done.stderr, *fragments)
        assert time.monotonic() - start < 60  # no 20 s of ray.init retries per attempt
    finally:
        server.stop(0)


def _driver_env(home) -> dict:
    """This environment without Ray settings and with a HOME of its own (no saved Ray token)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "HOME": str(home)}


def test_token_cluster_takes_the_token_from_the_environment(tmp_path):
    """A real Ray head with token authentication, its token nowhere on the driver's side but in
    ``RAY_AUTH_TOKEN`` (Ray itself ignores that variable unless ``RAY_AUTH_MODE=token``): the
    job runs and matches plaintext; without the token it is one line at once. Child processes,
    for the reason above; the driver gets a HOME of its own, so no saved token is found."""
    env = _driver_env(tmp_path)
    topo = write_topology(tmp_path / "t.yaml", connect_s=10)
    args = [sys.executable, "-m", "puma.cli", "generate", "-m", PRESET, "--ids", "1,2", "-n", "2", "--json"]
    with token_ray_head() as (address, token, _):
        args += ["--backend", "ray", "-c", topo, "--ray-address", address]
        start = time.monotonic()
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        _one_error_line(done.stderr, "uses token authentication", "--ray-token")
        assert time.monotonic() - start < 15
        done = subprocess.run(args, env=dict(env, RAY_AUTH_TOKEN=token), capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
    plain = SecureModel.from_pretrained(PRESET).generate_ids([[1, 2]], 2)
    assert json.loads(done.stdout)["tokens"] == plain.tokens[0]


def test_cluster_that_does_not_register_the_driver_is_one_line_within_connect_s(tmp_path):
    """A token-auth head whose saved token is removed while it runs no longer registers drivers,
    so ``ray.init`` would wait without end; puma's probe names the wait after ``connect_s``."""
    env = _driver_env(tmp_path)
    topo = write_topology(tmp_path / "t.yaml", connect_s=5)
    with token_ray_head(saved=True) as (address, token, saved_path):
        os.remove(saved_path)
        args = [sys.executable, "-m", "puma.cli", "generate", "-m", PRESET, "--ids", "1,2", "--backend", "ray"]
        args += ["-c", topo, "--ray-address", address, "--ray-token", token]
        start = time.monotonic()
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        _one_error_line(done.stderr, "did not register a driver within 5 s", "ray status")
        assert time.monotonic() - start < 5 + 15  # connect_s + imports


def test_ray_parties_link_over_tls(tmp_path, capsys):
    """Ray parties take the topology's TLS: with ``puma node certs``' files the job matches
    plaintext; with a CA that signed none of the parties' certificates each party refuses at
    once, naming the files (SPU's links would retry the failing handshakes for about 10 x
    ``connect_s``)."""
    pytest.importorskip("cryptography")
    good = {"cert": "certs/party.crt", "key": "certs/party.key", "ca": "certs/ca.crt"}
    topo = write_topology(tmp_path / "tls.yaml", tls=good)
    assert cli.main(["node", "certs", "-c", topo]) == 0
    elsewhere = {"cert": "other/party.crt", "key": "other/party.key", "ca": "other/ca.crt"}
    assert cli.main(["node", "certs", "-c", write_topology(tmp_path / "other.yaml", tls=elsewhere)]) == 0
    with SecureModel.from_pretrained(PRESET, backend="ray", config=topo) as m:
        secure = m.generate_ids(_ids(), 3)
    assert secure.tokens == SecureModel.from_pretrained(PRESET).generate_ids(_ids(), 3).tokens
    capsys.readouterr()
    mixed = write_topology(tmp_path / "mixed.yaml", tls=dict(good, ca="other/ca.crt"))
    start = time.monotonic()
    assert cli.main(["generate", "-m", PRESET, "--ids", "1,2", "--backend", "ray", "-c", mixed]) == 1
    assert time.monotonic() - start < 20
    _one_error_line(capsys.readouterr().err, "certs/party.crt is not signed by the CA in", "other/ca.crt")


@pytest.fixture(scope="module")
def two_cas(tmp_path_factory):
    """Two certificate sets from ``puma node certs`` (two CAs) in one folder."""
    pytest.importorskip("cryptography")
    root = tmp_path_factory.mktemp("cas")
    for name in ("a", "b"):
        tls = {"cert": f"{name}/party.crt", "key": f"{name}/party.key", "ca": f"{name}/ca.crt"}
        assert cli.main(["node", "certs", "-c", write_topology(root / f"{name}.yaml", tls=tls)]) == 0
    return root


@pytest.mark.parametrize(
    "cert, key, ca, fragment",
    [
        ("a/party.crt", "b/party.key", "a/ca.crt", "b/party.key does not belong to"),
        ("a/party.crt", "a/party.key", "b/ca.crt", "is not signed by the CA in"),
        ("a/party.key", "a/party.key", "a/ca.crt", "unusable TLS files"),
    ],
)
def test_tls_files_that_cannot_work_are_refused_at_party_start(two_cas, capfd, cert, key, ca, fragment):
    tls = {"cert": str(two_cas / cert), "key": str(two_cas / key), "ca": str(two_cas / ca)}
    topo = write_topology(two_cas / "t.yaml", tls=tls)
    assert cli.main(["node", "start", "-c", topo, "--rank", "1"]) == 3  # a party that cannot start
    _one_error_line(capfd.readouterr().err, "party p1:", fragment)
