"""Certificates for a topology's mutual TLS: one CA and one certificate per party host.

``puma node certs -c TOPOLOGY`` reads the topology's ``tls: {cert, key, ca}`` paths and the
hosts of its parties' link and control addresses, and writes (with the ``cryptography``
library): the CA certificate at ``ca`` and its key beside it (``<ca>.key``: keep it off the
party hosts), and for every host a key and a certificate signed by the CA, valid for that host
(subject alternative name: its IP address or DNS name) as TLS server and client: at the
topology's ``cert``/``key`` paths when every party runs on one host, else in ``<folder of
cert>/<host>/`` (copy each host's pair to the ``cert``/``key`` paths on that host). Parties
accept any certificate the CA signed (puma identifies parties by the shared CA, not by host
names). Existing files are kept unless ``overwrite``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from puma.errors import PumaError
from puma.runtime.config import Topology

#: Days a certificate is valid by default.
DAYS = 365


def _hosts(topology: Topology) -> list[str]:
    hosts = []
    for spec in topology.parties:
        for address in (spec.link, spec.control):
            host = address.rpartition(":")[0].strip("[]")
            if host not in hosts:
                hosts.append(host)
    return hosts


def _name(common: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "puma"), x509.NameAttribute(NameOID.COMMON_NAME, common)]
    )


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: str, data: bytes, private: bool, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise PumaError(f"{path} exists: pass --force to replace the certificates")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make(topology_path: str, days: int = DAYS, overwrite: bool = False) -> list[str]:
    """Write the CA and every host's certificate for ``topology_path``; the files written."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError as err:
        raise PumaError("making certificates needs the cryptography package: pip install cryptography") from err
    topology = Topology.from_yaml(topology_path, tls_files=False)
    if topology.tls is None:
        raise PumaError(
            f"{topology_path} has no tls section: add tls: {{cert: ..., key: ..., ca: ...}} (paths to write)"
        )
    tls = topology.tls
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def pem_key(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"puma CA for {os.path.basename(topology_path)}")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(ca_key, hashes.SHA256())
    )
    written = []
    for path, data, private in (
        (tls.ca, ca_cert.public_bytes(serialization.Encoding.PEM), False),
        (tls.ca + ".key", pem_key(ca_key), True),
    ):
        _write(path, data, private, overwrite)
        written.append(path)
    hosts = _hosts(topology)
    folder = os.path.dirname(tls.cert)
    for host in hosts:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(host))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        pair = [(cert.public_bytes(serialization.Encoding.PEM), False, tls.cert), (pem_key(key), True, tls.key)]
        for data, private, target in pair:
            path = target if len(hosts) == 1 else os.path.join(folder, host, os.path.basename(target))
            _write(path, data, private, overwrite)
            written.append(path)
    return written


def check(tls, who: str) -> None:
    """Refuse, in one line naming ``who`` and the file, TLS settings whose handshakes could only
    fail: a file that cannot be read or parsed, a key that does not belong to the certificate,
    a certificate the CA did not sign, or one out of its validity period. SPU's links would
    instead retry a failing handshake for many times ``connect_s`` and then say only that the
    mesh did not connect. A peer holding a certificate from another CA is still found only by
    its handshake."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    def read(path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as err:
            raise PumaError(f"{who}: cannot read the TLS {what} {path}: {err.strerror}") from None

    try:
        cert = x509.load_pem_x509_certificate(read(tls.cert, "certificate"))
        authorities = x509.load_pem_x509_certificates(read(tls.ca, "CA certificate"))
        key = serialization.load_pem_private_key(read(tls.key, "key"), password=None)
    except (ValueError, TypeError) as err:
        raise PumaError(f"{who}: unusable TLS files ({tls.cert}, {tls.key}, {tls.ca}): {err}") from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise PumaError(f"{who}: the TLS key {tls.key} does not belong to the certificate {tls.cert}")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PumaError(
            f"{who}: the TLS certificate {tls.cert} is valid only from {cert.not_valid_before_utc:%Y-%m-%d} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d}: make new ones (puma node certs -c TOPOLOGY --force)"
        )
    for authority in authorities:
        try:
            cert.verify_directly_issued_by(authority)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise PumaError(
        f"{who}: the TLS certificate {tls.cert} is not signed by the CA in {tls.ca}: "
        "give every party certificates from one CA (puma node certs -c TOPOLOGY)"
    )
