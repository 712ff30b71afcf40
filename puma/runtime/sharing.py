"""Fast secret sharing of float32 weights for ABY3, written with numpy and the OS's CSPRNG.

``spu.Io.make_shares`` shares about 2.8 million elements per second here (one thread): the
6.7 billion weights of LLaMA-7B would take 40 minutes per pass, which dominates a streamed run.
This module makes the same shares ~20x faster:

    v = trunc(x * 2^f)  (as SPU encodes floats: toward zero, as a ring element mod 2^k)
    v = x0 + x1 + x2 (mod 2^k),  x0, x1 uniform from ``os.urandom``,  x2 = v - x0 - x1
    party i holds (x_i, x_{i+1 mod 3})

laid out as SPU's ``aby3.AShr<FM64|FM128>`` values: per element the two ring elements of the
party's pair, little-endian, in protobuf ``ValueChunkProto`` chunks, and a ``ValueMetaProto``
header (dtype F32, secret, shape, storage type). The result is checked against
``spu.Io.reconstruct`` and against programs run on the shares (tests/test_streaming.py). Other
protocols, fields and dtypes fall back to ``spu.Io``.
"""

from __future__ import annotations

import os

import numpy as np
import spu.libspu as libspu

#: Bytes of share content per protobuf chunk. SPU's own is 128 MiB; SPU reads any size, and
#: 16 MiB chunks share 1.4x and ``set_var`` 4x faster here (the temporaries stay in cache and
#: in glibc's heap instead of fresh ``mmap`` pages; measured on a 4096 x 2752 tensor).
CHUNK_BYTES = 16 << 20

_DT_F32 = 11
_VIS_SECRET = 1
_RING_BITS = {"FM64": 64, "FM128": 128}


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


def _meta(shape: tuple[int, ...], field: str) -> bytes:
    """ValueMetaProto: data_type (1), visibility (3), shape (4, packed dims), storage_type (5)."""
    dims = b"".join(_varint(int(d)) for d in shape)
    shape_msg = _field(1, dims) if shape else b""
    return (
        _varint(1 << 3)
        + _varint(_DT_F32)
        + _varint(3 << 3)
        + _varint(_VIS_SECRET)
        + (_field(4, shape_msg) if shape else b"")
        + _field(5, f"aby3.AShr<{field}>".encode())
    )


def _chunk_head(total: int, offset: int, size: int) -> bytes:
    """Header of a ValueChunkProto: total_bytes (1), chunk_offset (2, omitted when 0), content (3)."""
    head = _varint(1 << 3) + _varint(total)
    if offset:
        head += _varint(2 << 3) + _varint(offset)
    return head + _varint(3 << 3 | 2) + _varint(size)


def supported(protocol: str, field: str, world_size: int) -> bool:
    return protocol == "aby3" and field in _RING_BITS and world_size == 3


def _encode(x: np.ndarray, fxp_bits: int, words: int) -> np.ndarray:
    """trunc(x * 2^f) as ``words`` little-endian uint64 words per element: [n, words]."""
    scaled = np.trunc(x.astype(np.float64) * float(2**fxp_bits)).astype(np.int64)
    out = np.empty((scaled.size, words), np.uint64)
    out[:, 0] = scaled.view(np.uint64)
    if words == 2:  # sign-extend into the high word
        out[:, 1] = np.where(scaled < 0, np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64(0))
    return out


def _random(n: int, words: int) -> np.ndarray:
    return np.frombuffer(os.urandom(n * words * 8), np.uint64).reshape(n, words).copy()


def _sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b mod 2^(64 * words) on [n, words] little-endian words."""
    low = a[:, 0] - b[:, 0]
    if a.shape[1] == 1:
        return low[:, None]
    borrow = (a[:, 0] < b[:, 0]).astype(np.uint64)
    return np.stack([low, a[:, 1] - b[:, 1] - borrow], axis=1)


def make_shares(value: np.ndarray, field: str, fxp_bits: int, chunk_bytes: int = CHUNK_BYTES) -> list[libspu.Share]:
    """ABY3 shares of float32 ``value``, one ``libspu.Share`` per party (see the module doc).

    Built one chunk at a time, so the owner's memory peaks at the shares themselves plus one
    chunk of temporaries.
    """
    x = np.asarray(value, np.float32)
    flat = np.ascontiguousarray(x).reshape(-1)
    words = _RING_BITS[field] // 64
    elem = 2 * words * 8  # bytes per element in one party's share
    total = flat.size * elem
    per_chunk = max(1, chunk_bytes // elem)
    chunks: list[list[bytes]] = [[], [], []]
    with np.errstate(over="ignore"):
        for start in range(0, flat.size, per_chunk):
            stop = min(flat.size, start + per_chunk)
            n = stop - start
            v = _encode(flat[start:stop], fxp_bits, words)
            x0, x1 = _random(n, words), _random(n, words)
            parts = (x0, x1, _sub(_sub(v, x0), x1))
            head = _chunk_head(total, start * elem, n * elem)
            pair = np.empty((n, 2, words), np.uint64)
            for rank in range(3):
                pair[:, 0] = parts[rank]
                pair[:, 1] = parts[(rank + 1) % 3]
                chunks[rank].append(b"".join((head, memoryview(pair.reshape(-1).view(np.uint8)))))
    meta = _meta(x.shape, field)
    shares = []
    for rank in range(3):
        share = libspu.Share()
        share.meta = meta
        share.share_chunks = chunks[rank]
        shares.append(share)
    return shares
