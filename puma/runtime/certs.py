"""Per-role certificates: who is who among the parties, the model owner and the clients.

``puma node certs -c TOPOLOGY`` writes into the topology's certificate folder (``tls: {dir:
certs}``), with EC P-256 keys (files mode 0600):

* ``ca.crt``/``ca.key``: the control CA. It signs one identity certificate per party
  (``party-<id>``), one for the model owner (``owner``) and one per client (``client-<name>``),
  with subject ``O=puma, OU=<role>, CN=<name>``. Control connections are mutual TLS against
  this CA; each end learns the other's :class:`Identity` from its certificate
  (:func:`peer_identity`), so no secret is shared by all roles.
* ``links-ca.crt``/``links-ca.key``: a second CA that signs only the parties' MPC-link
  certificates (``party-<id>-link``, valid for the host of the party's link address). The links
  trust only this CA, so no owner or client certificate can ever open an MPC link.

Keep both CA keys off the hosts: they only make certificates. Each host gets the files
:func:`needs` lists. :func:`sign` and :func:`verify` let a party's identity vouch for data
(ECDSA with SHA-256); :func:`check` refuses, at start-up, files whose handshakes could only fail.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import os
import ssl

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from puma.errors import PumaError
from puma.runtime.config import Topology, check_name

#: Days a certificate is valid by default.
DAYS = 365
#: The roles an identity certificate can name (its subject's OU).
ROLES = ("owner", "client", "party")


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who the peer of a control connection is: its role and its name in the topology."""

    role: str
    name: str

    def describe(self) -> str:
        return f"{self.role} {self.name}"


def make(topology_path: str, days: int = DAYS, force: bool = False, clients: tuple[str, ...] = ()) -> list[str]:
    """Write both CAs and every role's certificate for ``topology_path`` (its clients plus
    ``clients``) into its certificate folder; the files written. Existing files are refused
    unless ``force``, before anything is written."""
    topology = Topology.from_yaml(topology_path)
    if topology.tls is None:
        raise PumaError(f"{topology_path} has no tls section: add tls: {{dir: certs}} (the folder to write)")
    tls = topology.tls
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    topology_name = os.path.basename(topology_path)
    ca = _authority(f"puma control CA for {topology_name}", start, end)
    links = _authority(f"puma links CA for {topology_name}", start, end)
    files = [
        (path, os.path.splitext(path)[0] + ".key", authority)
        for path, authority in ((tls.ca, ca), (tls.links_ca, links))
    ]
    for p in topology.parties:
        if p in topology.served:  # a client-server client's party has a link and no control identity
            files.append((*tls.party(p.id), _leaf(_name("party", p.id), ca, start, end)))
        files.append((*tls.party_link(p.id), _leaf(_name("link", p.id), links, start, end, _host(p.link))))
    files.append((*tls.owner(topology.owner), _leaf(_name("owner", topology.owner), ca, start, end)))
    for name in _clients(topology, clients):
        files.append((*tls.client(name), _leaf(_name("client", name), ca, start, end)))
    paths = [path for cert, key, _ in files for path in (cert, key)]
    for path in paths:
        if paths.count(path) > 1:
            raise PumaError(f"{topology_path}: two identities would share the file {path}: rename a party")
        if os.path.exists(path) and not force:
            raise PumaError(f"{path} exists: pass --force to replace all the certificates")
    os.makedirs(tls.dir, exist_ok=True)
    for cert_path, key_path, (key, cert) in files:
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write(key_path, pem, 0o600)
    return paths


def needs(topology: Topology, clients: tuple[str, ...] = ()) -> list[tuple[str, list[str]]]:
    """Which certificate files each host needs, as (who, paths): a party host its parties' pairs
    (identity and link), both CA certificates and every party's identity certificate (public, to
    verify what the parties sign); the owner and each client their pair, the control CA and the
    parties' identity certificates. The CA keys go nowhere. In client-server mode the owner's
    host runs the owner's party, and each client also needs the client party's link pair, the
    links CA and the owner's certificate (it checks the manifest's signature)."""
    tls = topology.require_tls()
    public = [tls.party(p.id)[0] for p in topology.served]
    if topology.client_server:
        server, own = topology.parties
        owner = [tls.ca, tls.links_ca, *tls.party(server.id), *tls.party_link(server.id), *tls.owner(topology.owner)]
        client_extra = [tls.links_ca, *tls.party_link(own.id), tls.owner(topology.owner)[0]]
        out = [(f"owner {topology.owner} (party {server.id}, host {_host(server.link)})", owner)]
        for name in _clients(topology, clients):
            out.append((f"client {name} (its party {own.id})", [tls.ca, *tls.client(name), *public, *client_extra]))
        return out
    hosts: dict[str, list[str]] = {}
    for p in topology.parties:
        hosts.setdefault(_host(p.link), []).append(p.id)
    out = []
    for host, ids in hosts.items():
        files = [tls.ca, tls.links_ca]
        for party_id in ids:
            files += [*tls.party(party_id), *tls.party_link(party_id)]
        out.append((f"host {host} (party {', '.join(ids)})", files + [c for c in public if c not in files]))
    out.append((f"owner {topology.owner}", [tls.ca, *tls.owner(topology.owner), *public]))
    for name in _clients(topology, clients):
        out.append((f"client {name}", [tls.ca, *tls.client(name), *public]))
    return out


def peer_identity(sock: ssl.SSLSocket | ssl.SSLObject) -> Identity:
    """The identity in the verified certificate of a mutual-TLS peer (:func:`server_context`,
    :func:`client_context`); ``PermissionError`` if it names no puma role."""
    subject = {key: value for rdn in (sock.getpeercert() or {}).get("subject", ()) for key, value in rdn}
    role, name = subject.get("organizationalUnitName"), subject.get("commonName")
    if role not in ROLES or not name:
        raise PermissionError(f"the peer's certificate names no puma role (OU={role!r}, CN={name!r})")
    return Identity(role, name)


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """Mutual TLS (1.2 or later) for the accepting end: it presents ``cert`` and admits only
    peers with a certificate ``ca`` signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    return _mutual(ctx, cert, key, ca)


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """Mutual TLS (1.2 or later) for the connecting end. Host names are not checked: the peer
    is known by its certificate's subject (:func:`peer_identity`), which ``ca`` vouches for."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return _mutual(ctx, cert, key, ca)


def canonical(doc: dict) -> bytes:
    """A JSON document's canonical bytes (sorted keys, no whitespace): what a signature covers
    and a content hash hashes, so both ends compute the same bytes from parsed JSON."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign(key_path: str, data: bytes) -> bytes:
    """An ECDSA (SHA-256) signature of ``data`` with the private key in ``key_path``."""
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify(cert_path: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the signature of ``data`` by the key of the certificate in
    ``cert_path`` (whose own standing :func:`check` establishes)."""
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    try:
        cert.public_key().verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def check(cert: str, key: str, ca: str, who: str) -> None:
    """Refuse, in one line naming ``who`` and the file, a (certificate, key, CA) triple whose
    handshakes could only fail: a file that cannot be read or parsed, a key that does not belong
    to the certificate, a certificate ``ca`` did not sign, or one out of its validity period.
    SPU's links would instead retry a failing handshake for many times ``connect_s`` and then
    say only that the mesh did not connect."""

    def read(path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as err:
            raise PumaError(f"{who}: cannot read the TLS {what} {path}: {err.strerror}") from None

    try:
        certificate = x509.load_pem_x509_certificate(read(cert, "certificate"))
        authorities = x509.load_pem_x509_certificates(read(ca, "CA certificate"))
        private = serialization.load_pem_private_key(read(key, "key"), password=None)
    except (ValueError, TypeError) as err:
        raise PumaError(f"{who}: unusable TLS files ({cert}, {key}, {ca}): {err}") from None
    if _public(private.public_key()) != _public(certificate.public_key()):
        raise PumaError(f"{who}: the TLS key {key} does not belong to the certificate {cert}")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise PumaError(
            f"{who}: the TLS certificate {cert} is valid only from {certificate.not_valid_before_utc:%Y-%m-%d} "
            f"to {certificate.not_valid_after_utc:%Y-%m-%d}: make new ones (puma node certs -c TOPOLOGY --force)"
        )
    for authority in authorities:
        try:
            certificate.verify_directly_issued_by(authority)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise PumaError(
        f"{who}: the TLS certificate {cert} is not signed by the CA in {ca}: "
        "make all the certificates in one run (puma node certs -c TOPOLOGY)"
    )


def _mutual(ctx: ssl.SSLContext, cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    return ctx


def _clients(topology: Topology, extra: tuple[str, ...]) -> list[str]:
    """The topology's client names, then those of ``extra`` it does not list."""
    names = list(topology.clients)
    for name in extra:
        if check_name(name, "--client") not in names:
            names.append(name)
    return names


def _host(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


def _name(role: str | None, common: str) -> x509.Name:
    """Subject ``O=puma[, OU=role], CN=common``."""
    unit = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)] if role else []
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "puma"),
            *unit,
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _authority(common: str, start: datetime.datetime, end: datetime.datetime):
    """(key, self-signed CA certificate) that signs leaf certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(None, common)
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(subject: x509.Name, authority, start: datetime.datetime, end: datetime.datetime, host: str | None = None):
    """(key, certificate for ``subject`` signed by ``authority``), for TLS server and client
    use and signatures; valid for ``host`` (IP address or DNS name) if given."""
    ca_key, ca_cert = authority
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if host is not None:
        try:
            san = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write(path: str, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with exactly ``mode`` (also when replacing a file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
