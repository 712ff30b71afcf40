"""Typed control messages: the only things owners, clients and parties say to each other.

Nothing read from a socket or a file is unpickled. A message is a frame::

    b"PUMA" | u8 version | u32 header length | header | u32 buffer count | (u64 length | bytes) ...

The header is a UTF-8 JSON object ``{"op": <command or reply>, "args": {...}}`` whose values are
JSON only (strings, numbers, booleans, lists, objects); arrays and shares travel as raw buffers
that the arguments point at by index. Limits are checked before anything is allocated (header
size, buffer count, each buffer's size) and every argument is checked against the command's
schema (:data:`COMMANDS` in :mod:`puma.runtime.commands`) before a handler sees it, so an unknown
or malformed message is one log line and a closed connection.

Values:

- a ``libspu.Share`` is ``{"meta": i, "chunks": [j, ...]}``: its ValueMetaProto and
  ValueChunkProto bytes, which SPU parses itself;
- a :class:`~puma.runtime.sharing.Piece` is its integer fields plus buffers for the meta, the
  AES keys and the ring words;
- a :class:`~puma.runtime.roles.PartyShares` bundle is ``{"rank": r, "public": [...],
  "values": {name: share or piece}}``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import struct
from typing import Any

from puma.runtime import sharing

MAGIC = b"PUMA"
VERSION = 1
_HEAD = struct.Struct("!4sBI")
_COUNT = struct.Struct("!I")
_LENGTH = struct.Struct("!Q")

#: Largest header (JSON) accepted: names and specs, never data.
MAX_HEADER = 4 << 20
#: Most buffers in one message.
MAX_BUFFERS = 1 << 20
#: Largest buffer accepted (a chunk of shares; the owner sends 64 MiB of plaintext at a time).
MAX_BUFFER = 2 << 30

#: Names a client may give its inputs, outputs and state (no path tricks, no other namespace).
NAME = re.compile(r"^[A-Za-z0-9_.:/#~-]{1,512}$")


class MessageError(ValueError):
    """A frame or an argument that does not follow the schema."""


@dataclasses.dataclass
class Message:
    """One decoded frame: the command (or reply status), its JSON arguments and its buffers."""

    op: str
    args: dict
    buffers: list[bytes] = dataclasses.field(default_factory=list)


#: Kinds of ``error`` reply (its ``kind`` argument), each one line for the caller: ``failed``
#: (the command failed or was refused), ``retry`` (the party restarts to open its links anew: try
#: again shortly), ``idle`` (the party ended the client's job after ``timeouts.job_idle_s``
#: without a command from it, and serves the next client).
ERROR_KINDS = ("failed", "retry", "idle")


def error(line: str, kind: str = "failed") -> Message:
    """The ``error`` reply saying ``line`` (one line) of kind ``kind`` (:data:`ERROR_KINDS`)."""
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}")
    return Message("error", {"message": line, "kind": kind})


# -- frames -----------------------------------------------------------------------------------


def encode(message: Message) -> list[bytes]:
    """The frame of ``message`` as pieces to send in order (buffers are not copied)."""
    header = json.dumps({"op": message.op, "args": message.args}, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER:
        raise MessageError(f"header of {len(header)} bytes exceeds {MAX_HEADER}")
    parts = [_HEAD.pack(MAGIC, VERSION, len(header)), header, _COUNT.pack(len(message.buffers))]
    for buf in message.buffers:
        parts += [_LENGTH.pack(len(buf)), buf]
    return parts


def send(sock: socket.socket, message: Message) -> None:
    for part in encode(message):
        sock.sendall(part)


def receive(read) -> Message:
    """Read one frame with ``read(n) -> exactly n bytes``; checks every limit before reading
    what it announces."""
    magic, version, size = _HEAD.unpack(bytes(read(_HEAD.size)))
    if magic != MAGIC or version != VERSION:
        raise MessageError("not a puma message (bad magic or version)")
    if size > MAX_HEADER:
        raise MessageError(f"header of {size} bytes exceeds {MAX_HEADER}")
    try:
        header = json.loads(bytes(read(size)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MessageError(f"header is not JSON: {err}") from None
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("op"), str)
        or not isinstance(header.get("args"), dict)
    ):
        raise MessageError("header must be an object with 'op' (a string) and 'args' (an object)")
    (count,) = _COUNT.unpack(bytes(read(_COUNT.size)))
    if count > MAX_BUFFERS:
        raise MessageError(f"{count} buffers exceed {MAX_BUFFERS}")
    buffers = []
    for _ in range(count):
        (length,) = _LENGTH.unpack(bytes(read(_LENGTH.size)))
        if length > MAX_BUFFER:
            raise MessageError(f"a buffer of {length} bytes exceeds {MAX_BUFFER}")
        buffers.append(bytes(read(length)))
    return Message(header["op"], header["args"], buffers)


# -- values -----------------------------------------------------------------------------------


def _buffer(buffers: list[bytes], index) -> bytes:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(buffers):
        raise MessageError(f"buffer index {index!r} out of range")
    return buffers[index]


def _int(value, what: str, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise MessageError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def name(value, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME.match(value) or ".." in value:
        raise MessageError(f"{what} {value!r} is not a valid name")
    return value


def names(value, what: str = "names") -> list[str]:
    if not isinstance(value, list):
        raise MessageError(f"{what} must be a list")
    return [name(v, what) for v in value]


def put_share(share, buffers: list[bytes]) -> dict:
    """A ``libspu.Share`` or :class:`~puma.runtime.sharing.Piece` as JSON pointing into ``buffers``."""

    def add(data: bytes) -> int:
        buffers.append(data)
        return len(buffers) - 1

    if isinstance(share, sharing.Piece):
        return {
            "piece": {
                "meta": add(share.meta),
                "total": share.total,
                "start": share.start,
                "count": share.count,
                "words": share.words,
                "index": share.index,
                "keys": [None if k is None else add(k) for k in share.keys],
                "data": None if share.data is None else add(share.data),
                "last": share.last,
            }
        }
    return {"meta": add(share.meta), "chunks": [add(c) for c in share.share_chunks]}


def get_share(doc, buffers: list[bytes]):
    """The share ``doc`` describes (see :func:`put_share`), checked."""
    import spu.libspu as libspu

    if not isinstance(doc, dict):
        raise MessageError("a share must be an object")
    if "piece" in doc:
        p = doc["piece"]
        if not isinstance(p, dict) or not isinstance(p.get("keys"), list) or len(p["keys"]) not in (1, 2):
            raise MessageError("a piece needs its fields and one or two key slots")
        words = _int(p.get("words"), "piece words", 1)
        count = _int(p.get("count"), "piece count")
        data = None if p.get("data") is None else _buffer(buffers, p["data"])
        if data is not None and len(data) != count * words * 8:
            raise MessageError("piece data does not hold count x words ring words")
        keys = tuple(None if k is None else _buffer(buffers, k) for k in p["keys"])
        if any(k is not None and len(k) != sharing.KEY_BYTES for k in keys):
            raise MessageError("piece keys must be AES keys")
        return sharing.Piece(
            meta=_buffer(buffers, p.get("meta")),
            total=_int(p.get("total"), "piece total"),
            start=_int(p.get("start"), "piece start"),
            count=count,
            words=words,
            index=_int(p.get("index"), "piece index"),
            keys=keys,
            data=data,
            last=bool(p.get("last")),
        )
    chunks = doc.get("chunks")
    if not isinstance(chunks, list):
        raise MessageError("a share needs its chunks")
    share = libspu.Share()
    share.meta = _buffer(buffers, doc.get("meta"))
    share.share_chunks = [_buffer(buffers, c) for c in chunks]
    return share


def put_bundle(bundle, buffers: list[bytes]) -> dict:
    """A :class:`~puma.runtime.roles.PartyShares` as JSON pointing into ``buffers``."""
    return {
        "rank": bundle.rank,
        "public": sorted(bundle.public),
        "values": {k: put_share(v, buffers) for k, v in bundle.values.items()},
    }


def get_bundle(doc, buffers: list[bytes]):
    """The :class:`~puma.runtime.roles.PartyShares` ``doc`` describes, with checked names."""
    from puma.runtime.roles import PartyShares

    if not isinstance(doc, dict) or not isinstance(doc.get("values"), dict):
        raise MessageError("a bundle needs a rank and its values")
    values = {name(k, "share name"): get_share(v, buffers) for k, v in doc["values"].items()}
    return PartyShares(_int(doc.get("rank"), "bundle rank"), values, frozenset(names(doc.get("public", []))))


def jsonable(value: Any) -> bool:
    """Whether ``value`` is plain JSON (what arguments may be)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def put_profile(profile) -> dict | None:
    """A :class:`~puma.runtime.profiles.RunProfile` as JSON (None stays None)."""
    return None if profile is None else dataclasses.asdict(profile)


def get_profile(doc):
    """The :class:`~puma.runtime.profiles.RunProfile` ``doc`` describes, checked field by field."""
    from puma.runtime.profiles import OpCost, PartyCost, RunProfile

    if doc is None:
        return None
    try:
        ops = {str(k): OpCost(**v) for k, v in doc["ops"].items()}
        return RunProfile(
            str(doc["name"]), float(doc["exec_seconds"]), PartyCost(**doc["link"]), ops, int(doc["peak_rss"])
        )
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise MessageError(f"not a run profile: {err}") from None
