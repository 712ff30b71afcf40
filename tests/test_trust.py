"""Red team: owner, clients and parties are separate trust domains on ``nodes``.

Each attack is tried against running parties (``puma node up``) holding a model the owner
published with the default policy (tokens only), and each test asserts the refusal and that the
parties then serve an honest client's next job (same tokens as plaintext). The attacker speaks
the wire protocol directly (:mod:`puma.runtime.messages` frames over mutual TLS) with real
certificates of the deployment where the attack needs one.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import ssl

import pytest

from puma import cli, deploy
from puma.api import SecureModel
from puma.errors import PumaError
from puma.manifest import read_manifest
from puma.runtime import certs, commands, messages, wire
from puma.runtime.config import Topology
from puma.runtime.messages import Message
from puma.runtime.nodes import OWNER, NodesMesh
from tests.parties import local_parties, write_topology

PRESET = "llama-debug"
IDS = [[5, 6, 7, 8]]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Parties up, the preset published with the default policy: (topology, manifest, folder)."""
    root = tmp_path_factory.mktemp("deployment")
    topo = write_topology(root / "t.yaml", connect_s=10, recv_s=20)
    assert cli.main(["node", "certs", "-c", topo, "--force", "--client", "mallory"]) == 0
    with local_parties(topo, str(root)):
        manifest = str(root / "manifest.json")
        deploy.publish_to(topo, PRESET, manifest, sets=["puma-fast"])
        yield topo, manifest, root


def _honest_job_still_served(deployment):
    topo, manifest, _ = deployment
    expected = SecureModel.from_pretrained(PRESET, approx="puma-fast").generate_ids(IDS, 2).tokens
    with SecureModel.from_pretrained(manifest, backend="nodes", config=topo) as m:
        assert m.session.published == deploy.model_id(PRESET)  # the published model, not another
        assert m.generate_ids(IDS, 2).tokens == expected


def _channel(topology: Topology, role: str, name: str, rank: int = 0) -> wire.Channel:
    tls = topology.tls
    cert, key = {"client": tls.client, "owner": tls.owner, "party": tls.party}[role](name)
    host, port = topology.parties[rank].control_host_port
    return wire.connect(host, port, certs.client_context(cert, key, tls.ca), timeout=5)


def _ask(channel: wire.Channel, message: Message) -> Message:
    channel.send(message)
    return channel.recv()


def _met(topology: Topology) -> NodesMesh:
    """What a client learns from the parties' greetings (asked as the owner: no job)."""
    mesh = NodesMesh(topology, OWNER)
    mesh.close()
    return mesh


def _peers(topology: Topology) -> list[dict]:
    """The parties' signed greetings, as a client sends them with a job."""
    return _met(topology).greetings


def _server_pids(topology: Topology) -> list[int]:
    return _met(topology).server_pids


def _job(topology: Topology, manifest: str, name: str = "client") -> wire.Channel:
    """A client's job at the first party, opened by hand."""
    body, _, _ = read_manifest(manifest)
    peers = _peers(topology)
    channel = _channel(topology, "client", name)
    hello = {"protocol": {"protocol": "aby3", "field": "FM64"}, "world_size": 3, "rank": 0}
    assert _ask(channel, commands.encode("hello", hello)).op == "ok"
    reply = _ask(channel, Message("job", {"model": body["model_id"], "ticket": None, "peers": peers}))
    assert reply.op == "ok", reply
    channel.ticket = reply.args["value"]
    return channel


def _refused(channel: wire.Channel, message: Message, fragment: str) -> None:
    reply = _ask(channel, message)
    assert reply.op == "error" and fragment in reply.args["message"], reply
    with pytest.raises((wire.ChannelClosed, messages.MessageError)):
        channel.recv()  # the party closed the connection


def test_a_client_cannot_collect_or_receive_a_weight(deployment):
    topo, manifest, _ = deployment
    topology = Topology.from_yaml(topo)
    body, _, _ = read_manifest(manifest)
    weight = f"p:{body['model_id']}:embed_tokens/embedding"
    channel = _job(topology, manifest)
    _refused(channel, commands.encode("collect", {"names": [weight]}), "collect is not a command a client may give")
    channel = _job(topology, manifest)  # the keys of a client's own party exist only in client-server mode
    _refused(channel, commands.encode("client_manifest", {"model": body["model_id"]}), "owner party only")
    channel = _job(topology, manifest)
    reply = _ask(channel, commands.encode("outputs", {"names": [weight]}))
    assert reply.op == "error" and "not an output of the last run" in reply.args["message"]
    channel.close()
    _honest_job_still_served(deployment)


def test_a_client_cannot_run_code_or_programs_the_manifest_does_not_allow(deployment):
    topo, manifest, _ = deployment
    topology = Topology.from_yaml(topo)
    body, _, _ = read_manifest(manifest)
    channel = _job(topology, manifest)
    _refused(channel, commands.encode("install", {"key": "x", "name": "x", "code": b"pphlo"}), "install is not")
    task = {"model": body["model_id"], "slot": "-", "bind": {}, "secret": {}, "public": {}}
    for approx, spec, fragment in (
        ("puma-fast", ["logits", {}], "does not allow the task 'logits'"),
        ("puma-fast", ["identity", {}], "no program 'identity'"),
        ("spu", ["forward", {"reveal": "token", "sampling": [0.0, 0]}], "set 'spu' is not published"),
    ):
        channel = _job(topology, manifest)
        reply = _ask(channel, commands.encode("run_task", {**task, "approx": approx, "spec": spec}))
        assert reply.op == "error" and fragment in reply.args["message"], reply
        channel.close()
    _honest_job_still_served(deployment)


def test_logits_are_refused_when_the_policy_allows_tokens_only(deployment):
    topo, manifest, _ = deployment
    with SecureModel.from_pretrained(manifest, backend="nodes", config=topo) as m:
        with pytest.raises(PumaError, match="does not let clients receive logits"):
            m.generate_ids(IDS, 2, reveal="logits")
    _honest_job_still_served(deployment)


def test_no_one_but_the_operator_of_an_in_process_session_can_restore_a_store(deployment):
    """The store a party reads is its own (from its topology); ``restore``/``store`` with a
    folder the caller names are operator commands, which ``nodes`` grants no one."""
    topo, manifest, root = deployment
    topology = Topology.from_yaml(topo)
    forged = root / "forged"
    os.makedirs(forged / "party0")
    (forged / "party0" / "x.share").write_bytes(pickle.dumps(("meta", [b"chunk"])))
    channel = _job(topology, manifest)
    _refused(channel, commands.encode("restore", {"names": ["x"], "folder": str(forged)}), "restore is not")
    channel = _channel(topology, "owner", topology.owner)
    _refused(channel, commands.encode("restore", {"names": ["x"], "folder": str(forged)}), "restore is not")
    with pytest.raises(PumaError, match="is not a share file"):
        commands.read_share(str(forged / "party0" / "x.share"))  # and a store is never unpickled
    _honest_job_still_served(deployment)


@pytest.mark.parametrize("payload", ["pickle", "garbage", "oversized"])
def test_malformed_frames_close_the_connection(deployment, payload):
    """A pickle (which would run a shell if unpickled), bytes that are not a frame, and a frame
    announcing a header over the limit: one log line each, a closed connection, the next job
    served."""
    topo, manifest, _ = deployment
    topology = Topology.from_yaml(topo)
    channel = _channel(topology, "client", "client")

    class Shell:
        def __reduce__(self):
            return (os.system, ("touch /tmp/puma-pwned",))

    data = {
        "pickle": pickle.dumps(Shell()),
        "garbage": os.urandom(64),
        "oversized": messages.MAGIC + bytes([messages.VERSION]) + (messages.MAX_HEADER + 1).to_bytes(4, "big"),
    }[payload]
    channel.sock.sendall(data)
    with pytest.raises((wire.ChannelClosed, messages.MessageError)):
        channel.recv()
    assert not os.path.exists("/tmp/puma-pwned")
    _honest_job_still_served(deployment)


def test_a_client_cannot_upload_or_remove_a_model(deployment):
    topo, manifest, _ = deployment
    topology = Topology.from_yaml(topo)
    body, signature, _ = read_manifest(manifest)
    channel = _channel(topology, "client", "client")
    _refused(channel, commands.encode("publish", {"manifest": body, "signature": signature}), "publish is not")
    channel = _channel(topology, "client", "client")
    _refused(channel, commands.encode("unpublish", {"model": body["model_id"]}), "unpublish is not")
    _honest_job_still_served(deployment)


def test_a_manifest_not_signed_by_the_owner_is_refused(deployment):
    """Even the owner's connection cannot publish a manifest whose signature is not the owner's."""
    topo, manifest, _ = deployment
    topology = Topology.from_yaml(topo)
    body, _, _ = read_manifest(manifest)
    forged = dict(body, policy=dict(body["policy"], reveal=["token", "logits"]))
    signature = certs.sign(topology.tls.client("client")[1], certs.canonical(forged))
    channel = _channel(topology, "owner", topology.owner)
    _refused(channel, commands.encode("publish", {"manifest": forged, "signature": signature}), "not signed by")
    _honest_job_still_served(deployment)


def test_unknown_identities_are_refused(deployment, tmp_path):
    """A client certificate the topology does not admit (mallory), a party's own certificate on
    the control port, and a certificate of another deployment."""
    topo, manifest, root = deployment
    topology = Topology.from_yaml(topo)
    for role, name in (("client", "mallory"), ("party", "p1")):
        channel = _channel(topology, role, name)
        reply = channel.recv()
        assert reply.op == "error" and "is not admitted by this party's topology" in reply.args["message"]
    os.makedirs(tmp_path / "other")
    other = Topology.from_yaml(write_topology(tmp_path / "other" / "t.yaml"))
    cert, key = other.tls.client("client")
    host, port = topology.parties[0].control_host_port
    with pytest.raises((wire.HandshakeFailed, ssl.SSLError, ConnectionError)):
        wire.connect(host, port, certs.client_context(cert, key, other.tls.ca), timeout=5).recv()
    _honest_job_still_served(deployment)


def test_a_ticket_cannot_be_forged_or_reused(deployment):
    """The parties after the first admit a job only with the first party's signature over this
    client, this model and a job not served yet."""
    topo, manifest, _ = deployment
    topology = Topology.from_yaml(topo)
    body, _, _ = read_manifest(manifest)
    peers = _peers(topology)
    first = _job(topology, manifest)
    real = first.ticket

    def present(ticket: dict) -> wire.Channel:
        channel = _channel(topology, "client", "client", rank=1)
        hello = {"protocol": {"protocol": "aby3", "field": "FM64"}, "world_size": 3, "rank": 1}
        assert _ask(channel, commands.encode("hello", hello)).op == "ok"
        channel.send(Message("job", {"model": body["model_id"], "ticket": ticket, "peers": peers}))
        return channel

    forged = dict(real["ticket"], job=real["ticket"]["job"] + 10**6)
    own = certs.sign(topology.tls.client("client")[1], certs.canonical(forged)).hex()
    channel = present({"ticket": forged, "signature": own})
    reply = channel.recv()
    assert reply.op == "error" and "not signed by the first party" in reply.args["message"]
    channel.close()
    used = present(real)
    assert used.recv().op == "ok"  # the real ticket, once
    again = present(real)
    reply = again.recv()
    assert reply.op == "error" and "was used already" in reply.args["message"]
    for channel in (again, used, first):
        channel.close()
    _honest_job_still_served(deployment)


def test_a_client_cannot_make_parties_restart_with_a_false_peers_list(deployment):
    """A party opens its links anew (restarting itself) only when the job's greetings show a
    peer really restarted: each greeting is signed by its party and none may come from a run
    older than one the party met. A false pid, a missing greeting, or an earlier run's greeting
    (signed here with the party's key, as that run would have) is refused, and no party restarts."""
    topo, manifest, _ = deployment
    topology = Topology.from_yaml(topo)
    body, _, _ = read_manifest(manifest)
    _honest_job_still_served(deployment)  # links open with the current runs
    before = _server_pids(topology)
    real = _peers(topology)

    def ask(peers) -> Message:
        channel = _channel(topology, "client", "client")
        hello = {"protocol": {"protocol": "aby3", "field": "FM64"}, "world_size": 3, "rank": 0}
        assert _ask(channel, commands.encode("hello", hello)).op == "ok"
        reply = _ask(channel, Message("job", {"model": body["model_id"], "ticket": None, "peers": peers}))
        channel.close()
        return reply

    def signed_by_party(run: dict) -> dict:
        signature = certs.sign(topology.tls.party(run["party"])[1], certs.canonical(run)).hex()
        return {**run, "signature": signature}

    earlier = {key: real[2][key] for key in ("party", "pid", "started")}
    earlier.update(pid=earlier["pid"] + 1, started=earlier["started"] - 60.0)
    attempts = [
        ([real[0], real[1], dict(real[2], pid=real[2]["pid"] + 1)], "the greeting of party p2 is not signed by it"),
        ([real[0], real[1], real[1]], "the greeting of party p2 is not signed by it"),
        (real[:2], "the job names 2 peers, not 3 parties' greetings"),
        ([1, 2, 3], "not a party's greeting"),
        ([real[0], real[1], signed_by_party(earlier)], "the greeting of party p2 comes from an earlier run of it"),
    ]
    for peers, fragment in attempts:
        reply = ask(peers)
        assert reply.op == "error" and fragment in reply.args["message"], reply
    assert _server_pids(topology) == before  # no party restarted
    _honest_job_still_served(deployment)
    assert _server_pids(topology) == before


def test_a_changed_model_file_gets_a_new_id(tmp_path, stories_gguf):
    path = tmp_path / "model.gguf"
    shutil.copy(stories_gguf, path)
    before = deploy.model_id(str(path))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert deploy.model_id(str(path)) != before
    assert deploy.model_id(stories_gguf) == before  # the id is the content's, not the path's


def test_ports_listen_on_the_topology_addresses_only(deployment):
    topo, _, _ = deployment
    for party in Topology.from_yaml(topo).parties:
        host, port = party.control_host_port
        assert host == "127.0.0.1"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", port), timeout=1).close()
