"""Failures of the nodes backend end in one clear error, in bounded time, with a non-zero exit.

Covered: a party that never starts, a party killed mid-run (client, supervisor and surviving
parties, which serve the next job), a second client while a job runs (it queues), a control
port in use, malformed topologies, a job for another protocol, a protocol whose party count does
not match the topology, and certificates (made by ``puma node certs``) that cannot work.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from puma import cli, deploy
from puma.api import SecureModel
from puma.errors import PumaError
from puma.runtime.children import parent_death_signal
from tests.parties import (
    assert_serves_published,
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
#: Hang guards: a failure due within a configured timeout (connect_s, recv_s, queue_s, ...) must
#: end within that timeout plus this margin (imports, process starts, compiling, a loaded 2-core
#: machine). They catch a wait that never ends, not a slow machine: no test here asserts a speed.
HANG_MARGIN_S = 60


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
        preexec_fn=parent_death_signal,
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
    connect_s = 3
    topo = write_topology(tmp_path / "t.yaml", connect_s=connect_s)
    procs = [_start_party(topo, r, str(tmp_path)) for r in (0, 1)]
    try:
        wait_for_ports(control_ports(topo)[:2])
        start = time.monotonic()
        code = cli.main(["generate", "-m", PRESET, "-p", "x", "--backend", "nodes", "-c", topo])
        assert code != 0
        assert time.monotonic() - start < connect_s + HANG_MARGIN_S, "hang guard"
    finally:
        _stop(*procs)
    _one_error_line(capsys.readouterr().err, "p2", "unreachable")


def _ids():
    return [[5, 6, 7, 8]]


def test_party_killed_mid_run(tmp_path):
    """Multi-host layout (``node start`` per party). Kill party 2's process during a run: the
    client fails at once naming it; its supervisor starts it again, the survivors (whose links
    broke: yacl may end them, their supervisors restart them too) serve the next job once it is
    back, and no supervisor ends. Then kill party 2's supervisor: restarted alone, it rejoins
    the others (its store kept the published model)."""
    recv_s = 6
    topo = write_topology(tmp_path / "t.yaml", connect_s=30, recv_s=recv_s)
    procs = {r: _start_party(topo, r, str(tmp_path)) for r in range(3)}
    try:
        wait_for_ports(control_ports(topo))
        m = SecureModel.from_pretrained(PRESET, backend="nodes", config=topo)
        victim = m.session.mesh.pids[2]
        assert victim not in [p.pid for p in procs.values()]

        killed = {}

        def kill_after_first_token(_):
            os.kill(victim, signal.SIGKILL)
            killed["at"] = time.monotonic()

        with pytest.raises(PumaError, match=r"p2 \(rank 2\) died"):  # seen dead, not timed out
            m.generate_ids(_ids(), 6, use_cache=False, progress=kill_after_first_token)
        assert time.monotonic() - killed["at"] < recv_s + HANG_MARGIN_S, "hang guard"
        m.close()
        start = time.monotonic()
        with SecureModel.from_pretrained(PRESET, backend="nodes", config=topo) as m2:
            assert time.monotonic() - start < 2 * recv_s + HANG_MARGIN_S, "hang guard: the parties took the job"
            assert_serves_published(m2, PRESET, _ids())
        assert all(p.poll() is None for p in procs.values()), "a supervisor ended with its party"
        assert "p2 (rank 2) was killed by SIGKILL" in open(tmp_path / "party2.stderr").read()

        procs[2].kill()  # party 2's host goes down; only it is restarted
        procs[2].wait(10)
        time.sleep(1)
        procs[2] = _start_party(topo, 2, str(tmp_path))
        wait_for_ports(control_ports(topo))
        with SecureModel.from_pretrained(PRESET, backend="nodes", config=topo) as m3:
            assert_serves_published(m3, PRESET, _ids())  # party 2's store kept the published model
        assert procs[0].poll() is None and procs[1].poll() is None
    finally:
        _stop(*procs.values())


def test_second_client_queues_and_is_told_its_position(tmp_path, caplog):
    """While a job holds the parties, a second client waits in the first party's queue, told its
    position and never who is ahead; past queue_s it gets one line. A client queued while the
    job ends gets the parties next."""
    queue_s = 3
    topo = write_topology(tmp_path / "t.yaml", connect_s=5, queue_s=queue_s)
    with local_parties(topo, str(tmp_path)):
        first = SecureModel.from_pretrained(PRESET, backend="nodes", config=topo)
        start = time.monotonic()
        with caplog.at_level("INFO", logger="puma.progress"), pytest.raises(PumaError) as err:
            SecureModel.from_pretrained(PRESET, backend="nodes", config=topo)
        waited = time.monotonic() - start
        assert queue_s <= waited < queue_s + HANG_MARGIN_S, waited  # waited its queue_s; the upper one a hang guard
        message = str(err.value)
        assert "gave up after 3 s in the queue at position 1" in message, message
        assert "127.0.0.1" not in message and "client" not in message
        assert any("queued at party p0" in r.getMessage() for r in caplog.records)
        assert not any("127.0.0.1" in r.getMessage() for r in caplog.records if "queued" in r.getMessage())
        first.close()
        with SecureModel.from_pretrained(PRESET, backend="nodes", config=topo) as second:
            assert_serves_published(second, PRESET, _ids())


def test_an_idle_job_is_ended_and_the_next_client_served(tmp_path):
    """A client that opens a job and goes silent holds the parties for job_idle_s only: then each
    party ends its job and serves the client queued behind it (plaintext's logits); the silent
    client's next command gets one line saying why. Control connections use TCP keep-alive."""
    idle_s = 3
    topo = write_topology(tmp_path / "t.yaml", connect_s=10, recv_s=20, job_idle_s=idle_s)
    with local_parties(topo, str(tmp_path)):
        manifest = deploy.ensure_published(topo, PRESET, "puma-fast")
        silent = SecureModel.from_pretrained(manifest, approx="puma-fast", backend="nodes", config=topo)
        served: dict = {}

        def next_client():
            start = time.monotonic()
            try:
                with SecureModel.from_pretrained(manifest, approx="puma-fast", backend="nodes", config=topo) as m:
                    served["admitted_after"] = time.monotonic() - start
                    assert_serves_published(m, PRESET, _ids())
            except BaseException as err:  # reported below
                served["error"] = err

        queued = threading.Thread(target=next_client, daemon=True)
        try:
            channels = silent.session.mesh.channels
            assert all(c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) for c in channels)
            queued.start()
            time.sleep(idle_s + 1.5)  # the silent job has ended; its connections wait for its next command
            with pytest.raises(PumaError) as ended:
                silent.generate_ids(_ids(), 2)
        finally:
            silent.close()
            queued.join(180)
        assert not queued.is_alive() and "error" not in served, served
        assert idle_s - 1 <= served["admitted_after"] < idle_s + HANG_MARGIN_S, served  # upper: a hang guard
    line = str(ended.value)
    assert "\n" not in line and "ended this job after 3 s without a command (timeouts.job_idle_s)" in line, line
    assert line.startswith("party p")
    logged = open(tmp_path / "node-up.stderr").read()
    assert "party p0: ended the job of client client after 3 s without a command" in logged


def test_supervisor_restarts_a_dead_party(tmp_path):
    topo = write_topology(tmp_path / "t.yaml", connect_s=20, recv_s=5)
    with local_parties(topo, str(tmp_path)) as up:
        with SecureModel.from_pretrained(PRESET, backend="nodes", config=topo) as m:
            m.generate_ids(_ids(), 1)
            os.kill(m.session.mesh.pids[1], signal.SIGKILL)
            with pytest.raises(PumaError, match=r"p1 \(rank 1\) died or dropped the connection"):
                m.generate_ids(_ids(), 2)
        with SecureModel.from_pretrained(PRESET, backend="nodes", config=topo) as m:
            assert_serves_published(m, PRESET, _ids())  # the restarted party reloaded its shares
        assert up.poll() is None
    err = open(tmp_path / "node-up.stderr").read()
    assert "party p1 (rank 1) was killed by SIGKILL" in err and "starting it again" in err


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
        (_set("timeouts", {"job_idle_s": 0}), "timeouts.job_idle_s must be a positive number"),
        (_set("auth_key", "puma-local"), "auth_key is gone"),
        (_set("tls", {"cert": "a", "key": "b", "ca": "c"}), "tls now names a folder of per-role certificates"),
        (_set("tls", {"dir": "certs", "kee": "d"}), "unknown key 'tls.kee'"),
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
        (  # on two computing parties, party 0 must never hold a weight in the clear
            "protocol: cheetah\nruntime: {experimental_enable_colocated_optimization: true}\nparties:\n"
            "  - {link: 'a:1', control: 'a:2'}\n  - {link: 'a:3', control: 'a:4'}\n",
            "experimental_enable_colocated_optimization is set by mode: client-server",
        ),
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
        manifest = deploy.ensure_published(topo, PRESET, "puma-fast")
        ports = control_ports(topo)
        other = write_topology(
            tmp_path / "2pc.yaml",
            protocol="cheetah",
            world=2,
            ports=free_ports(2) + ports[:2],
            tls={"dir": str(tmp_path / "certs")},
            certificates=False,
        )
        with pytest.raises(PumaError, match=r"runs aby3/FM64 with 3 parties; the job asked for cheetah/FM64 with 2"):
            SecureModel.from_pretrained(manifest, backend="nodes", config=other)


def test_protocol_needs_other_party_count(tmp_path, capsys):
    topo = write_topology(tmp_path / "t.yaml")
    assert (
        cli.main(["generate", "-m", PRESET, "-p", "x", "--backend", "nodes", "-c", topo, "--protocol", "semi2k"]) != 0
    )
    _one_error_line(capsys.readouterr().err, "protocol semi2k needs 2 parties", "lists 3")


def test_nodes_backend_without_topology(capsys):
    assert cli.main(["generate", "-m", PRESET, "-p", "x", "--backend", "nodes"]) != 0
    _one_error_line(capsys.readouterr().err, "needs a topology")


def test_certificates_of_another_deployment_are_refused(tmp_path):
    """The parties run over mutual TLS with ``puma node certs``' files; a client whose
    certificate comes from another run of ``puma node certs`` (another CA) is refused at the
    handshake, in one line."""
    topo = write_topology(tmp_path / "t.yaml", connect_s=2)
    with local_parties(topo, str(tmp_path)):
        manifest = deploy.ensure_published(topo, PRESET, "puma-fast")
        with SecureModel.from_pretrained(manifest, approx="puma-fast", backend="nodes", config=topo) as m:
            assert_serves_published(m, PRESET, _ids())
        os.makedirs(tmp_path / "elsewhere")
        stranger = write_topology(
            tmp_path / "elsewhere" / "t.yaml", connect_s=2, ports=free_ports(3) + control_ports(topo)
        )
        shutil.copy(tmp_path / "certs" / "owner.crt", tmp_path / "elsewhere" / "certs")  # the manifest checks out
        with pytest.raises(PumaError, match="p0 .* did not complete the TLS handshake"):
            SecureModel.from_pretrained(manifest, backend="nodes", config=stranger)


def test_unreachable_ray_address_is_one_line_within_connect_s(tmp_path, capsys):
    port = free_ports(1)[0]
    connect_s = 2
    topo = write_topology(tmp_path / "t.yaml", connect_s=connect_s)
    start = time.monotonic()
    args = ["generate", "-m", PRESET, "-p", "x", "--backend", "ray", "-c", topo, "--ray-address", f"127.0.0.1:{port}"]
    assert cli.main(args) != 0
    assert time.monotonic() - start < connect_s + HANG_MARGIN_S, "hang guard"
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
                assert_serves_published(m, PRESET, _ids())
                assert m.generate_ids(_ids(), 2).cost.total_bytes_sent > 0
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
        for extra, fragments in (
            ([], ("uses token authentication", "--ray-token")),
            (["--ray-token", "wrong"], ("refused the token given", "ray get-auth-token")),
        ):
            done = subprocess.run(args + extra, env=env, capture_output=True, text=True, timeout=5 + HANG_MARGIN_S)
            assert done.returncode == 1, done.stderr
            _one_error_line(done.stderr, *fragments)  # named at once, not after ray.init's retries
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
    connect_s = 10
    topo = write_topology(tmp_path / "t.yaml", connect_s=connect_s)
    args = [sys.executable, "-m", "puma.cli", "generate", "-m", PRESET, "--ids", "1,2", "-n", "2", "--json"]
    with token_ray_head() as (address, token, _):
        args += ["--backend", "ray", "-c", topo, "--ray-address", address]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=connect_s + HANG_MARGIN_S)
        assert done.returncode == 1, done.stderr
        _one_error_line(done.stderr, "uses token authentication", "--ray-token")
        done = subprocess.run(args, env=dict(env, RAY_AUTH_TOKEN=token), capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
    plain = SecureModel.from_pretrained(PRESET).generate_ids([[1, 2]], 2)
    assert json.loads(done.stdout)["tokens"] == plain.tokens[0]


def test_cluster_that_does_not_register_the_driver_is_one_line_within_connect_s(tmp_path):
    """A token-auth head whose saved token is removed while it runs no longer registers drivers,
    so ``ray.init`` would wait without end; puma's probe names the wait after ``connect_s``."""
    env = _driver_env(tmp_path)
    connect_s = 5
    topo = write_topology(tmp_path / "t.yaml", connect_s=connect_s)
    with token_ray_head(saved=True) as (address, token, saved_path):
        os.remove(saved_path)
        args = [sys.executable, "-m", "puma.cli", "generate", "-m", PRESET, "--ids", "1,2", "--backend", "ray"]
        args += ["-c", topo, "--ray-address", address, "--ray-token", token]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=connect_s + HANG_MARGIN_S)
        assert done.returncode == 1, done.stderr
        _one_error_line(done.stderr, "did not register a driver within 5 s", "ray status")


def test_ray_parties_link_over_tls(tmp_path, capsys):
    """Ray parties take the topology's link certificates: with ``puma node certs``' files the
    job matches plaintext; with a links CA that signed none of them each party refuses at once,
    naming the files (SPU's links would retry the failing handshakes for about 10 x
    ``connect_s``)."""
    connect_s = 5
    topo = write_topology(tmp_path / "tls.yaml", connect_s=connect_s)
    with SecureModel.from_pretrained(PRESET, backend="ray", config=topo) as m:
        secure = m.generate_ids(_ids(), 3)
    assert secure.tokens == SecureModel.from_pretrained(PRESET).generate_ids(_ids(), 3).tokens
    capsys.readouterr()
    os.makedirs(tmp_path / "other")
    write_topology(tmp_path / "other" / "t.yaml")
    shutil.copy(tmp_path / "other" / "certs" / "links-ca.crt", tmp_path / "certs" / "links-ca.crt")
    start = time.monotonic()
    assert cli.main(["generate", "-m", PRESET, "--ids", "1,2", "--backend", "ray", "-c", topo]) == 1
    assert time.monotonic() - start < connect_s + HANG_MARGIN_S, "hang guard"
    # puma's own check names the files (SPU's links would retry the handshake instead):
    _one_error_line(capsys.readouterr().err, "-link.crt is not signed by the CA in", "links-ca.crt")


@pytest.fixture(scope="module")
def two_cas(tmp_path_factory):
    """Two certificate folders from two runs of ``puma node certs`` (two CAs)."""
    root = tmp_path_factory.mktemp("cas")
    for name in ("a", "b"):
        os.makedirs(root / name)
        write_topology(root / name / "t.yaml", ports=free_ports(6))
    return root


@pytest.mark.parametrize(
    "replace, fragment",
    [
        ("party-p1.key", "party-p1.key does not belong to"),
        ("ca.crt", "is not signed by the CA in"),
        ("links-ca.crt", "party-p1-link.crt is not signed by the CA in"),
    ],
)
def test_tls_files_that_cannot_work_are_refused_at_party_start(two_cas, tmp_path, capfd, replace, fragment):
    folder = tmp_path / "certs"
    shutil.copytree(two_cas / "a" / "certs", folder)
    shutil.copy(two_cas / "b" / "certs" / replace, folder / replace)
    topo = write_topology(tmp_path / "t.yaml", certificates=False)
    assert cli.main(["node", "start", "-c", topo, "--rank", "1"]) == 3  # a party that cannot start
    _one_error_line(capfd.readouterr().err, "party p1", fragment)
