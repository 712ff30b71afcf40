"""Fast secret sharing of float32 weights: numpy, AES-CTR streams, compact delivery.

``spu.Io.make_shares`` shares about 2.8 million elements per second here (one thread): the
6.7 billion weights of LLaMA-7B would take 40 minutes per pass, which dominates a streamed run.
This module makes the same shares much faster and moves a third of their bytes:

    v = trunc(x * 2^f)  (as SPU encodes floats: toward zero, as a ring element mod 2^k)
    x0 = AES-CTR(k0), x1 = AES-CTR(k1)  (fresh 128-bit keys k0, k1 from ``os.urandom`` per tensor)
    x2 = v - x0 - x1 (mod 2^k)
    party i holds (x_i, x_{i+1 mod 3})

The owner does not send the pairs. Party 0 gets the keys k0 and k1 and regenerates (x0, x1);
party 1 gets k1 and x2; party 2 gets x2 and k0. So each party learns exactly its pair (the keys
travel over the same authenticated channel as shares would), the owner moves 2 ring elements
per weight instead of 6, and each party expands its own share. A tensor travels as
:class:`Piece` objects, one per party and chunk of ``CHUNK_BYTES`` of share content, so neither
the owner nor a party ever holds more than one chunk in transit; :class:`Assembler` collects a
party's pieces into the ``libspu.Share`` SPU's ``set_var`` reads.

The expanded share is laid out as SPU's ``aby3.AShr<FM64|FM128>`` values: per element the two
ring elements of the party's pair, little-endian, in protobuf ``ValueChunkProto`` chunks, and a
``ValueMetaProto`` header (dtype F32, secret, shape, storage type). The result is checked against
``spu.Io.reconstruct`` and against programs run on the shares (tests/test_streaming.py).

The two-party protocols (``cheetah``; ``semi2k`` where it runs) hold additive shares, one ring
element per party and weight: ``x1 = AES-CTR(k1)`` and ``x0 = v - x1``. Party 0 gets ``x0`` as
data, party 1 only the key ``k1``: its share is uniformly random whatever the weights.

In the client-server deployment party 0 is the model owner's own, so there is nothing to share
(``owner_private``, :mod:`puma.runtime.client_server`): party 0 keeps ``v`` as its private value
(SPU's ``Priv2k<FM64,0>``, colocated optimization) and party 1 holds a placeholder of the same
shape, all zeros, which SPU's kernels never read: the client's party holds nothing of a weight,
and cheetah multiplies a secret by the owner's private matrix with one homomorphic product.
Other fields and dtypes fall back to ``spu.Io``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np
import spu.libspu as libspu
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: Bytes of share content per protobuf chunk (and per piece). SPU's own is 128 MiB; SPU reads
#: any size, and 16 MiB chunks share 1.4x and ``set_var`` 4x faster here (the temporaries stay in
#: cache and in glibc's heap instead of fresh ``mmap`` pages; measured on a 4096 x 2752 tensor).
CHUNK_BYTES = 16 << 20

#: A weight whose share at one party would exceed ``SPLIT_BYTES`` travels as row blocks (axis 0)
#: of at most ``BLOCK_BYTES``, each its own value ``name#k``, which the parties then join by a
#: concatenation they run (``SecureSession``). SPU's ``set_var`` holds three copies of a value
#: while it stores it (the Python chunks, their protobuf copy, the array); a join holds two. For
#: LLaMA-7B's 32000 x 4096 embedding that is 4.2 GB per party instead of 6.3 GB.
SPLIT_BYTES = 1 << 30
BLOCK_BYTES = 256 << 20

_DT_F32 = 11
_VIS_SECRET = 1
_VIS_PRIVATE = 3
_RING_BITS = {"FM32": 32, "FM64": 64, "FM128": 128}
KEY_BYTES = 16


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _meta(shape: tuple[int, ...], field: str, protocol: str = "aby3", owner: int | None = None) -> bytes:
    """ValueMetaProto: data_type (1), visibility (3), shape (4, packed dims), storage_type (5):
    a secret share, or with ``owner`` a private value of party ``owner``."""
    dims = b"".join(_varint(int(d)) for d in shape)
    shape_msg = _field(1, dims) if shape else b""
    storage = f"{protocol}.AShr<{field}>" if owner is None else f"Priv2k<{field},{owner}>"
    return (
        _varint(1 << 3)
        + _varint(_DT_F32)
        + _varint(3 << 3)
        + _varint(_VIS_SECRET if owner is None else _VIS_PRIVATE)
        + (_field(4, shape_msg) if shape else b"")
        + _field(5, storage.encode())
    )


def _chunk_head(total: int, offset: int, size: int) -> bytes:
    """Header of a ValueChunkProto: total_bytes (1), chunk_offset (2, omitted when 0), content (3)."""
    head = _varint(1 << 3) + _varint(total)
    if offset:
        head += _varint(2 << 3) + _varint(offset)
    return head + _varint(3 << 3 | 2) + _varint(size)


def row_blocks(shape: tuple[int, ...], field: str) -> list[tuple[int, int]]:
    """The row ranges a weight of ``shape`` travels in under ``field``; [] when it goes whole
    (sized for ABY3's two ring elements per weight: a two-party share's blocks are half full)."""
    shape = tuple(int(d) for d in shape)
    per_party = 2 * _RING_BITS[field] // 8 * int(np.prod(shape, dtype=np.int64))
    if not shape or per_party <= SPLIT_BYTES:
        return []
    rows = max(1, BLOCK_BYTES // (per_party // shape[0]))
    return [(start, min(shape[0], start + rows)) for start in range(0, shape[0], rows)]


def block_name(name: str, k: int) -> str:
    """The name block ``k`` of weight ``name`` has until the parties join it."""
    return f"{name}#{k}"


#: Protocols whose arithmetic shares this module makes, and their party count.
PROTOCOLS = {"aby3": 3, "cheetah": 2, "semi2k": 2}


def supported(protocol: str, field: str, world_size: int) -> bool:
    # the numpy sharer writes whole 64-bit words: FM32 goes through spu.Io
    return PROTOCOLS.get(protocol) == world_size and _RING_BITS.get(field, 0) >= 64


def _encode(x: np.ndarray, fxp_bits: int, words: int) -> np.ndarray:
    """trunc(x * 2^f) as ``words`` little-endian uint64 words per element: [n, words]."""
    scaled = np.trunc(x.astype(np.float64) * float(2**fxp_bits)).astype(np.int64)
    out = np.empty((scaled.size, words), np.uint64)
    out[:, 0] = scaled.view(np.uint64)
    if words == 2:  # sign-extend into the high word
        out[:, 1] = np.where(scaled < 0, np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64(0))
    return out


_zeros = bytes(0)


def _stream(key: bytes, index: int, n: int, words: int) -> np.ndarray:
    """Ring elements of chunk ``index`` of the AES-128-CTR stream of ``key``: [n, words] uint64.

    Chunk ``index`` starts at counter block ``index * 2^64``, so chunks never overlap."""
    global _zeros
    size = n * words * 8
    if len(_zeros) < size:
        _zeros = bytes(size)
    out = np.empty(size + 16, np.uint8)  # update_into wants room for one more block
    encryptor = Cipher(algorithms.AES(key), modes.CTR((index << 64).to_bytes(16, "big"))).encryptor()
    encryptor.update_into(memoryview(_zeros)[:size], out)
    return out[:size].view(np.uint64).reshape(n, words)


def _sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b mod 2^(64 * words) on [n, words] little-endian words."""
    low = a[:, 0] - b[:, 0]
    if a.shape[1] == 1:
        return low[:, None]
    borrow = (a[:, 0] < b[:, 0]).astype(np.uint64)
    return np.stack([low, a[:, 1] - b[:, 1] - borrow], axis=1)


@dataclasses.dataclass
class Piece:
    """What the owner sends one party for one chunk of one tensor.

    The party's pair ``(x_r, x_{r+1})`` (ABY3) has two slots, a two-party share one; each slot
    is regenerated from an AES key (``keys[slot]``) or carried as ring words (``data``, for the
    slot holding ``x2``, a two-party ``x0`` or the owner's private value). A piece with neither
    is a private value's placeholder at the other party: zeros.
    """

    meta: bytes  # ValueMetaProto of the whole tensor
    total: int  # bytes of share content of the whole tensor at this party
    start: int  # first element of the chunk
    count: int  # elements in the chunk
    words: int  # uint64 words per ring element (1: FM64, 2: FM128)
    index: int  # chunk number: the AES-CTR stream position
    keys: tuple[bytes | None, bytes | None]
    data: bytes | None
    last: bool  # the tensor's last chunk

    @property
    def nbytes(self) -> int:
        """Bytes the owner sends for this piece."""
        return len(self.meta) + len(self.data or b"") + sum(KEY_BYTES for k in self.keys if k)

    def expand(self) -> bytes:
        """This chunk of the party's share as a ValueChunkProto."""
        n, words, slots = self.count, self.words, len(self.keys)
        elem = slots * words * 8
        pair = np.empty((n, slots, words), np.uint64)
        for slot, key in enumerate(self.keys):
            if key is None and self.data is None:
                pair[:, slot] = 0
            elif key is None:
                pair[:, slot] = np.frombuffer(self.data, np.uint64).reshape(n, words)
            else:
                pair[:, slot] = _stream(key, self.index, n, words)
        head = _chunk_head(self.total, self.start * elem, n * elem)
        return b"".join((head, memoryview(pair.reshape(-1).view(np.uint8))))


def pieces(
    value: np.ndarray,
    field: str,
    fxp_bits: int,
    chunk_bytes: int = CHUNK_BYTES,
    protocol: str = "aby3",
    owner_private: bool = False,
) -> Iterator[list[Piece]]:
    """Shares of float32 ``value`` under ``protocol`` as pieces: per chunk, one :class:`Piece`
    per party (three for ABY3, two for the two-party protocols). ``owner_private`` (two-party
    only): party 0's piece is the value itself, private to it, and party 1's a placeholder.

    Made one chunk at a time, so the owner holds one chunk of temporaries whatever the size."""
    x = np.asarray(value, np.float32)
    flat = np.ascontiguousarray(x).reshape(-1)
    words = _RING_BITS[field] // 64
    slots = 2 if PROTOCOLS[protocol] == 3 else 1
    elem = slots * words * 8  # bytes per element in one party's share
    total = flat.size * elem
    per_chunk = max(1, chunk_bytes // elem)
    if owner_private and slots != 1:
        raise ValueError(f"only a two-party protocol keeps the owner's weights private, not {protocol}")
    meta = _meta(x.shape, field, protocol, owner=0 if owner_private else None)
    k0, k1 = os.urandom(KEY_BYTES), os.urandom(KEY_BYTES)
    starts = range(0, flat.size, per_chunk) if flat.size else [0]
    with np.errstate(over="ignore"):
        for index, start in enumerate(starts):
            stop = min(flat.size, start + per_chunk)
            n = stop - start
            v = _encode(flat[start:stop], fxp_bits, words)
            last = stop >= flat.size
            common = dict(meta=meta, total=total, start=start, count=n, words=words, index=index, last=last)
            if owner_private:
                yield [
                    Piece(keys=(None,), data=v.tobytes(), **common),  # party 0: v, its own
                    Piece(keys=(None,), data=None, **common),  # party 1: a placeholder (zeros)
                ]
                continue
            if slots == 1:
                x0 = _sub(v, _stream(k1, index, n, words)).tobytes()
                yield [
                    Piece(keys=(None,), data=x0, **common),  # party 0: x0 = v - x1
                    Piece(keys=(k1,), data=None, **common),  # party 1: x1, uniformly random
                ]
                continue
            x2 = _sub(_sub(v, _stream(k0, index, n, words)), _stream(k1, index, n, words)).tobytes()
            yield [
                Piece(keys=(k0, k1), data=None, **common),  # party 0: (x0, x1)
                Piece(keys=(k1, None), data=x2, **common),  # party 1: (x1, x2)
                Piece(keys=(None, k0), data=x2, **common),  # party 2: (x2, x0)
            ]


def placeholder(shape: tuple[int, ...], field: str, chunk_bytes: int = CHUNK_BYTES):
    """Party 1's stand-in for party 0's private value of ``shape`` (``owner_private``): the
    placeholder :func:`pieces` gives it, all zeros, built without a byte from the owner."""
    words = _RING_BITS[field] // 64
    size = int(np.prod(shape, dtype=np.int64))
    elem = words * 8
    per_chunk = max(1, chunk_bytes // elem)
    meta = _meta(tuple(int(d) for d in shape), field, owner=0)
    assembler = Assembler()
    starts = range(0, size, per_chunk) if size else [0]
    for index, start in enumerate(starts):
        stop = min(size, start + per_chunk)
        piece = Piece(meta, size * elem, start, stop - start, words, index, (None,), None, stop >= size)
        share = assembler.add("value", piece)
    return share


class Assembler:
    """A party's pieces, collected per name into the ``libspu.Share`` of the whole tensor."""

    def __init__(self):
        self._chunks: dict[str, list[bytes]] = {}

    def add(self, name: str, piece: Piece) -> libspu.Share | None:
        """Take one piece of ``name``; the finished share after its last piece, else None."""
        chunks = self._chunks.setdefault(name, [])
        if piece.count:
            chunks.append(piece.expand())
        if not piece.last:
            return None
        del self._chunks[name]
        share = libspu.Share()
        share.meta = piece.meta
        share.share_chunks = chunks
        return share


def make_shares(
    value: np.ndarray,
    field: str,
    fxp_bits: int,
    chunk_bytes: int = CHUNK_BYTES,
    protocol: str = "aby3",
    owner_private: bool = False,
) -> list[libspu.Share]:
    """Every party's whole ``libspu.Share`` of ``value`` at once (its pieces, expanded)."""
    parties = PROTOCOLS[protocol]
    assemblers = [Assembler() for _ in range(parties)]
    shares: list[libspu.Share | None] = [None] * parties
    for parts in pieces(value, field, fxp_bits, chunk_bytes, protocol, owner_private):
        for rank, piece in enumerate(parts):
            shares[rank] = assemblers[rank].add("value", piece) or shares[rank]
    return shares
