"""Per-role certificates (``puma node certs``) and the topology's identity settings.

Checks, without SPU: the files, their modes and subjects; a mutual-TLS handshake in which a
client and a party each learn the other's identity; a certificate from another CA is refused;
link certificates come from their own CA, so no client certificate opens an MPC link;
signatures; and one-line refusals of topologies with ``auth_key``, the old ``tls`` form or no
``tls`` at all.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import threading

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from puma import cli
from puma.errors import PumaError
from puma.runtime import certs
from puma.runtime.config import Topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _topology(folder, name: str = "3pc.yaml", drop: tuple[str, ...] = (), **changes) -> str:
    """configs/3pc.yaml copied to ``folder``/``name``, without the keys ``drop`` and with
    ``changes``; its path."""
    path = os.path.join(folder, name)
    shutil.copy(os.path.join(ROOT, "configs", "3pc.yaml"), path)
    if changes or drop:
        with open(path) as f:
            doc = yaml.safe_load(f)
        for key in drop:
            del doc[key]
        doc.update(changes)
        with open(path, "w") as f:
            yaml.safe_dump(doc, f)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A topology copied from configs/3pc.yaml and its certificates (one extra client, alice)."""
    path = _topology(tmp_path_factory.mktemp("topology"))
    written = certs.make(path, days=30, clients=("alice",))
    return Topology.from_yaml(path), written


def _cert(path) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def _subject(path) -> tuple[str, ...]:
    """(O, OU, CN) of the certificate at ``path``."""
    name = _cert(path).subject
    oids = (NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.COMMON_NAME)
    return tuple(name.get_attributes_for_oid(oid)[0].value for oid in oids)


def test_files_modes_and_subjects(made):
    topology, written = made
    tls = topology.tls
    assert tls.dir == os.path.join(os.path.dirname(topology.source), "certs")
    expected = {"ca.crt", "ca.key", "links-ca.crt", "links-ca.key", "owner.crt", "owner.key"}
    for party_id in ("alice", "bob", "carol"):
        expected |= {f"party-{party_id}{suffix}" for suffix in (".crt", ".key", "-link.crt", "-link.key")}
    expected |= {f"client-{name}{suffix}" for name in ("client", "alice") for suffix in (".crt", ".key")}
    assert {os.path.basename(p) for p in written} == expected == set(os.listdir(tls.dir))
    for path in written:
        mode = os.stat(path).st_mode & 0o777
        assert mode == (0o600 if path.endswith(".key") else 0o644), path
    assert _subject(tls.party("bob")[0]) == ("puma", "party", "bob")
    assert _subject(tls.owner("owner")[0]) == ("puma", "owner", "owner")
    assert _subject(tls.client("alice")[0]) == ("puma", "client", "alice")
    link = _cert(tls.party_link("carol")[0])
    san = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for cert, key in (tls.party("alice"), tls.owner("owner"), tls.client("client")):
        certs.check(cert, key, tls.ca, "test")
    certs.check(*tls.party_link("alice"), tls.links_ca, "test")
    assert topology.require_tls() == tls


def test_existing_files_are_refused_without_force(made):
    topology, _ = made
    with pytest.raises(PumaError, match=r"ca\.crt exists: pass --force"):
        certs.make(topology.source)


def test_cli_lists_what_each_host_needs(tmp_path, capsys):
    path = _topology(tmp_path)
    assert cli.main(["node", "certs", "-c", path, "--client", "dave"]) == 0
    out, err = capsys.readouterr()
    assert os.path.join(str(tmp_path), "certs", "client-dave.key") in out.splitlines()
    assert "host 127.0.0.1 (party alice, bob, carol): ca.crt links-ca.crt party-alice.crt party-alice.key" in err
    assert "client dave: ca.crt client-dave.crt client-dave.key party-alice.crt party-bob.crt party-carol.crt" in err
    assert cli.main(["node", "certs", "-c", path]) == 1
    assert cli.main(["node", "certs", "-c", path, "--force"]) == 0


def test_parties_on_several_hosts(tmp_path):
    """Link certificates name their host (IP address or DNS name); each party host is told its
    own pairs and every party's public identity certificate."""
    hosts = ("10.0.0.1", "10.0.0.1", "mpc.example.org")
    parties = [
        {"id": party_id, "link": f"{host}:{7000 + i}", "control": f"{host}:{7100 + i}"}
        for i, (party_id, host) in enumerate(zip(("alice", "bob", "carol"), hosts))
    ]
    path = _topology(tmp_path, parties=parties)
    certs.make(path)
    topology = Topology.from_yaml(path)
    tls = topology.tls
    assert not topology.loopback
    san = _cert(tls.party_link("carol")[0]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mpc.example.org"]
    needs = {who: [os.path.basename(p) for p in paths] for who, paths in certs.needs(topology)}
    assert needs["host 10.0.0.1 (party alice, bob)"] == [
        "ca.crt",
        "links-ca.crt",
        "party-alice.crt",
        "party-alice.key",
        "party-alice-link.crt",
        "party-alice-link.key",
        "party-bob.crt",
        "party-bob.key",
        "party-bob-link.crt",
        "party-bob-link.key",
        "party-carol.crt",
    ]
    assert needs["owner owner"] == [
        "ca.crt",
        "owner.crt",
        "owner.key",
        "party-alice.crt",
        "party-bob.crt",
        "party-carol.crt",
    ]
    assert not any(name.endswith("ca.key") for paths in needs.values() for name in paths)


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext):
    """Both ends' view of a TLS handshake over a socket pair: (server's peer, client's peer),
    each an Identity or the exception its end raised."""
    a, b = socket.socketpair()
    seen = {}

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                seen["server"] = certs.peer_identity(s)
        except (ssl.SSLError, OSError) as err:
            seen["server"] = err

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b) as s:
            seen["client"] = certs.peer_identity(s)
    except (ssl.SSLError, OSError) as err:
        seen["client"] = err
    finally:
        b.close()
        thread.join(10)
    return seen["server"], seen["client"]


def test_client_and_party_learn_each_others_identity(made):
    tls = made[0].tls
    server, client = _handshake(
        certs.server_context(*tls.party("bob"), tls.ca), certs.client_context(*tls.client("alice"), tls.ca)
    )
    assert server == certs.Identity("client", "alice") and server.describe() == "client alice"
    assert client == certs.Identity("party", "bob")


def test_a_certificate_from_another_ca_is_refused(made, tmp_path):
    tls = made[0].tls
    other_path = _topology(tmp_path)
    certs.make(other_path)
    other = Topology.from_yaml(other_path).tls
    server, _ = _handshake(
        certs.server_context(*tls.party("bob"), tls.ca), certs.client_context(*other.client("client"), other.ca)
    )
    assert isinstance(server, ssl.SSLError)
    with pytest.raises(PumaError, match="is not signed by the CA in"):
        certs.check(*other.client("client"), tls.ca, "client client")


def test_links_have_their_own_ca(made):
    """A party's link certificate is signed by links-ca, not ca; a client's certificate does not
    validate against links-ca, so it cannot open an MPC link."""
    tls = made[0].tls
    link = _cert(tls.party_link("alice")[0])
    link.verify_directly_issued_by(_cert(tls.links_ca))
    with pytest.raises(Exception):
        link.verify_directly_issued_by(_cert(tls.ca))
    with pytest.raises(PumaError, match="is not signed by the CA in"):
        certs.check(*tls.client("client"), tls.links_ca, "client client")
    server, _ = _handshake(
        certs.server_context(*tls.party_link("alice"), tls.links_ca),
        certs.client_context(*tls.client("client"), tls.ca),
    )
    assert isinstance(server, ssl.SSLError)


def test_sign_and_verify(made):
    tls = made[0].tls
    cert, key = tls.party("alice")
    signature = certs.sign(key, b"result of job 7")
    assert certs.verify(cert, b"result of job 7", signature)
    assert not certs.verify(cert, b"result of job 8", signature)
    assert not certs.verify(tls.party("bob")[0], b"result of job 7", signature)


def test_topology_defaults_and_loopback(made):
    topology = made[0]
    assert topology.owner == "owner" and topology.clients == ("client",)
    assert topology.store == os.path.join(os.path.dirname(topology.source), "store")
    assert topology.queue_timeout_s == 600 and topology.loopback
    with open(topology.source) as f:
        doc = yaml.safe_load(f)
    doc["parties"][2]["link"] = "10.0.0.3:61532"
    assert not Topology.from_dict(doc).loopback


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"auth_key": "puma-local"}, "auth_key is gone: owner, clients and parties identify each other by certificate"),
        ({"tls": {"cert": "a", "key": "b", "ca": "c"}}, "tls now names a folder of per-role certificates"),
        ({"tls": {"folder": "certs"}}, "unknown key 'tls.folder'"),
        ({"clients": ["bob", "bob"]}, "'clients' lists a name twice"),
        ({"owner": "a/b"}, "owner 'a/b' must be letters"),
    ],
)
def test_topology_refusals_are_one_line(tmp_path, changes, fragment):
    with pytest.raises(PumaError) as err:
        Topology.from_yaml(_topology(tmp_path, **changes))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_require_tls_says_how_to_make_certificates(tmp_path):
    for path, fragment in (
        (_topology(tmp_path, "a.yaml", drop=("tls",)), "the nodes backend needs per-role certificates: add `tls:"),
        (_topology(tmp_path, "b.yaml", tls="elsewhere"), f"no certificates in {tmp_path / 'elsewhere'}: run"),
    ):
        with pytest.raises(PumaError) as err:
            Topology.from_yaml(path).require_tls()
        assert fragment in str(err.value) and f"puma node certs -c {path}" in str(err.value)
        assert "\n" not in str(err.value)
