"""Control connections between owners, clients and parties: mutual TLS, typed frames.

Every end holds its own certificate (:mod:`puma.runtime.certs`: the role and name are in its
subject), so each side knows who it talks to (``Channel.peer``) and nothing is shared by all
roles. What travels is :mod:`puma.runtime.messages` frames: JSON headers and raw buffers, never
pickle. The MPC traffic itself goes over SPU's links, which use the parties' link certificates.
"""

from __future__ import annotations

import socket
import ssl
import threading

from puma.runtime import certs, messages
from puma.runtime.messages import Message

#: Seconds a TLS handshake may take before the connection is dropped.
HANDSHAKE_TIMEOUT = 10.0
#: TCP keep-alive on every control connection: the first probe after this many idle seconds,
#: then one every KEEPALIVE_INTERVAL_S; KEEPALIVE_PROBES unanswered probes end the connection, so
#: a peer whose host vanished (no FIN, no RST) is noticed within about two minutes.
KEEPALIVE_IDLE_S = 60
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 6


class ChannelClosed(ConnectionError):
    """The peer closed the connection or died."""


class TimedOut(ChannelClosed):
    """Nothing arrived within the channel's timeout (:meth:`Channel.settimeout`)."""


class HandshakeFailed(ConnectionError):
    """TCP connected but TLS did not complete (certificates from another CA, or none)."""


class Channel:
    """One mutually authenticated, framed connection; ``peer`` is who is at the other end."""

    def __init__(self, sock: socket.socket, peer: certs.Identity):
        self.sock = sock
        self.peer = peer
        #: Held for one exchange (a send and its replies): an OpenSSL connection must not be used
        #: by two threads at once (it crashes the process).
        self.lock = threading.Lock()

    def send(self, message: Message) -> None:
        try:
            messages.send(self.sock, message)
        except (ssl.SSLError, OSError) as err:
            raise ChannelClosed(str(err)) from err

    def recv(self) -> Message:
        return messages.receive(self._read)

    def _read(self, n: int) -> bytearray:
        """Exactly ``n`` bytes, read into one buffer (no second copy of large messages)."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                count = self.sock.recv_into(view[got:], min(n - got, 1 << 22))
            except TimeoutError as err:  # socket.timeout: no byte within the timeout
                raise TimedOut(str(err) or "timed out") from err
            except (ConnectionResetError, ssl.SSLError, OSError) as err:
                raise ChannelClosed(str(err)) from err
            if not count:
                raise ChannelClosed("connection closed")
            got += count
        return buf

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def abort(self) -> None:
        """Wake a thread blocked reading this channel (its read ends as closed) without touching
        the TLS state that thread is using: a shutdown of the socket underneath."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _keep_alive(sock: socket.socket) -> None:
    """TCP keep-alive with puma's timing where the platform lets it be set (Linux does)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket; raises ``OSError`` (errno EADDRINUSE) when the port is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(16)
    return sock


def accept(sock: socket.socket, context: ssl.SSLContext) -> Channel:
    """The party's side of a new connection: TLS with a certificate of the deployment's CA, the
    peer's identity read from it. Raises ``OSError``/``ssl.SSLError``/``PermissionError``."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _keep_alive(sock)
    try:
        tls = context.wrap_socket(sock, server_side=True)
        peer = certs.peer_identity(tls)
    except BaseException:
        sock.close()
        raise
    tls.settimeout(None)
    return Channel(tls, peer)


def connect(host: str, port: int, context: ssl.SSLContext, timeout: float) -> Channel:
    """Connect to a party with this end's certificate; the party's identity is in ``peer``."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(HANDSHAKE_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _keep_alive(sock)
    try:
        tls = context.wrap_socket(sock)
        peer = certs.peer_identity(tls)
    except (socket.timeout, ssl.SSLError, PermissionError) as err:
        sock.close()
        raise HandshakeFailed(str(err) or type(err).__name__) from err
    except BaseException:
        sock.close()
        raise
    tls.settimeout(None)
    return Channel(tls, peer)
