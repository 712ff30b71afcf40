"""The driver <-> party control channel: length-prefixed pickled messages over TCP.

Both ends prove knowledge of the topology's ``auth_key`` with an HMAC challenge before any
pickle is read (pickles are only ever loaded from an authenticated peer). With TLS configured in
the topology the socket is wrapped in mutual TLS using the same certificates as the party links.
The channel carries shares, programs and results; the MPC traffic itself goes over SPU's links.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import socket
import ssl
import struct

from puma.runtime.config import TLSConfig

_HEADER = struct.Struct("!Q")
_CHALLENGE = 32


class ChannelClosed(ConnectionError):
    """The peer closed the connection or died."""


class HandshakeFailed(ConnectionError):
    """TCP connected but TLS or authentication did not complete (settings differ)."""


class Channel:
    """One authenticated, framed connection."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(_HEADER.pack(len(data)))
        self.sock.sendall(data)

    def recv(self):
        (size,) = _HEADER.unpack(self._read(_HEADER.size))
        return pickle.loads(self._read(size))

    def _read(self, n: int) -> bytearray:
        """Exactly ``n`` bytes, read into one buffer (no second copy of large messages)."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                count = self.sock.recv_into(view[got:], min(n - got, 1 << 22))
            except (ConnectionResetError, ssl.SSLError, OSError) as err:
                raise ChannelClosed(str(err)) from err
            if not count:
                raise ChannelClosed("connection closed")
            got += count
        return buf

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _server_context(tls: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(tls.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _client_context(tls: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(tls.ca)
    ctx.check_hostname = False  # parties are identified by the shared CA, not by host names
    return ctx


def _answer(sock_recv, sock_send, key: bytes) -> None:
    challenge = os.urandom(_CHALLENGE)
    sock_send(challenge)
    digest = sock_recv(32)
    if not hmac.compare_digest(digest, hmac.new(key, challenge, hashlib.sha256).digest()):
        raise PermissionError("peer failed authentication (auth_key mismatch)")


def _prove(sock_recv, sock_send, key: bytes) -> None:
    challenge = sock_recv(_CHALLENGE)
    sock_send(hmac.new(key, challenge, hashlib.sha256).digest())


def listen(host: str, port: int) -> socket.socket:
    """A listening socket; raises ``OSError`` (errno EADDRINUSE) when the port is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(8)
    return sock


#: Seconds a TLS handshake plus authentication may take before the connection is dropped.
HANDSHAKE_TIMEOUT = 10.0


def handshake(sock: socket.socket, auth_key: str, tls: TLSConfig | None) -> Channel:
    """The party's side of a driver's connection: TLS (if configured), then mutual
    authentication; raises ``PermissionError`` for a wrong ``auth_key``."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if tls is not None:
            sock = _server_context(tls).wrap_socket(sock, server_side=True)
        ch = Channel(sock)
        key = auth_key.encode()
        _answer(ch._read, sock.sendall, key)
        _prove(ch._read, sock.sendall, key)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return ch


def connect(host: str, port: int, auth_key: str, tls: TLSConfig | None, timeout: float) -> Channel:
    """Connect to a party and authenticate both ways."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(HANDSHAKE_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if tls is not None:
            sock = _client_context(tls).wrap_socket(sock)
        ch = Channel(sock)
        key = auth_key.encode()
        _prove(ch._read, sock.sendall, key)
        _answer(ch._read, sock.sendall, key)
    except (socket.timeout, ssl.SSLError, ChannelClosed, PermissionError) as err:
        sock.close()
        raise HandshakeFailed(str(err) or type(err).__name__) from err
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return ch
