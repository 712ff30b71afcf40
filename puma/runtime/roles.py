"""The three roles of private inference, kept apart in code.

- :class:`ModelOwner` holds the plaintext weights. It turns them into one bundle of shares per
  computing party and receives nothing back: no input, no output.
- :class:`Client` holds the plaintext inputs. It sends each party its shares of the secret
  inputs (and the public ones in the clear), and it alone reconstructs outputs, from the output
  shares of all parties. It never receives the weights.
- :class:`~puma.runtime.party.ComputeParty` (one per rank) receives only :class:`PartyShares`:
  shares of weights, inputs and state, public inputs, and compiled programs. It never sees a
  plaintext weight, input or output; any single party's shares are uniformly random.

Share objects are ``spu.libspu.Share`` values made by ``spu.Io``; they pickle, so they travel to
threads, processes and Ray actors alike.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Union

import numpy as np
import spu
import spu.libspu as libspu

from puma.runtime import sharing
from puma.runtime.config import COLOCATED
from puma.runtime.params import LazyParams, flatten


@dataclasses.dataclass
class PartyShares:
    """What one computing party receives: named values, each a ``libspu.Share``.

    Secret values are this party's shares only; public values (``public`` names) are the same at
    every party. ``rank`` says whose bundle this is.
    """

    rank: int
    values: dict[str, "libspu.Share | sharing.Piece"]
    public: frozenset[str] = frozenset()

    @property
    def nbytes(self) -> int:
        """Bytes of the bundle's values as they travel (pieces in their compact form)."""
        return sum(_nbytes(v) for v in self.values.values())


def _nbytes(value: "libspu.Share | sharing.Piece") -> int:
    if isinstance(value, sharing.Piece):
        return value.nbytes
    return len(value.meta) + sum(len(c) for c in value.share_chunks)


def _split(io: spu.Io, named: dict[str, np.ndarray], visibility, world_size: int) -> list[dict]:
    per_party: list[dict] = [{} for _ in range(world_size)]
    for name, value in named.items():
        for rank, share in enumerate(io.make_shares(np.asarray(value), visibility)):
            per_party[rank][name] = share
    return per_party


#: Plaintext bytes of weights shared and delivered at a time (resident loading).
CHUNK_BYTES = 64 << 20

#: One party's share of a weight: a whole ``libspu.Share`` or a piece of one.
PartyValue = Union[libspu.Share, sharing.Piece]

#: How the owner shares one tensor (or only its row block k): per step, the name suffix (a row
#: block's ``#k``, see :func:`puma.runtime.sharing.row_blocks`), one value per party and the
#: plaintext bytes covered.
ShareFunction = Callable[[np.ndarray, "int | None"], Iterator[tuple[str, list[PartyValue], int]]]


@dataclasses.dataclass(frozen=True)
class OwnerSpec:
    """Where the model owner reads its weights: a source for :func:`puma.models.load`; ``joins``
    (the family's, for a set with fused projections): projections it stores side by side."""

    source: str
    overrides: tuple = ()
    seed: int = 0
    joins: tuple = ()

    def open(self) -> LazyParams:
        """The weights, opened lazily (nothing is read until a tensor is asked for)."""
        from puma.models import load
        from puma.models.loading import join_projections

        lazy = load(self.source, overrides=dict(self.overrides) or None, seed=self.seed, lazy=True).lazy
        return join_projections(lazy, self.joins) if self.joins else lazy


def share_function(config: libspu.RuntimeConfig, world_size: int) -> ShareFunction:
    """How the owner secret-shares one float32 tensor under ``config``: in pieces by the
    sharer of :mod:`puma.runtime.sharing` where it applies, whole by ``spu.Io`` otherwise; a
    tensor too big to store in one go is shared as row blocks, each on its own.

    Under client-server mode's config (SPU's colocated optimization, which only
    ``mode: client-server`` turns on: :class:`~puma.runtime.config.ProtocolConfig`) party 0 is
    the owner's own and keeps each weight as its private value; party 1 gets a placeholder."""
    protocol, field = config.protocol.name.lower(), config.field.name
    owner_private = world_size == 2 and bool(getattr(config, COLOCATED))
    if sharing.supported(protocol, field, world_size):
        bits = int(config.fxp_fraction_bits)

        def one(value):
            for parts in sharing.pieces(value, field, bits, protocol=protocol, owner_private=owner_private):
                yield parts, parts[0].count * 4

    else:
        io = spu.Io(world_size, config)
        owner_rank = 0 if owner_private else -1

        def one(value):
            yield io.make_shares(value, libspu.Visibility.VIS_SECRET, owner_rank), value.nbytes

    def share(value, block: int | None = None):
        value = np.asarray(value, np.float32)
        blocks = sharing.row_blocks(value.shape, field)
        if not blocks:
            for parts, plain in one(value):
                yield "", parts, plain
        for k, (start, stop) in enumerate(blocks):
            if block is None or block == k:
                for parts, plain in one(value[start:stop]):
                    yield sharing.block_name("", k), parts, plain

    return share


class ModelOwner:
    """Holds the model's plaintext weights; gives each computing party its shares of them.

    The weights are a :class:`~puma.runtime.params.LazyParams`: each tensor is read (or made,
    for presets) when it is shared and dropped right after, so the owner holds one plaintext
    tensor and the shares of one chunk at a time, whatever the model's size.
    """

    PREFIX = "p:"

    def __init__(self, params: "dict | LazyParams"):
        self._weights = params if isinstance(params, LazyParams) else _lazy_tree(params)
        self._kept: tuple[str, np.ndarray] | None = None  # the table whose row blocks are being shared

    def _tensor(self, name: str, in_blocks: bool) -> np.ndarray:
        """Weight ``name``; a table shared block by block is read (dequantized) once and kept
        until another is asked for."""
        if not in_blocks:
            return self._weights.get(name)
        if self._kept is None or self._kept[0] != name:
            self._kept = None
            self._kept = (name, np.asarray(self._weights.get(name), np.float32))
        return self._kept[1]

    @classmethod
    def from_spec(cls, spec: OwnerSpec) -> "ModelOwner":
        """Open the weights named by ``spec`` lazily (in the owner's own process)."""
        return cls(spec.open())

    def names(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Parameter names as the parties know them, with shapes and dtypes (public metadata)."""
        return {self.PREFIX + k: (shape, "float32") for k, shape in self._weights.shapes.items()}

    def share_chunks(
        self,
        share: ShareFunction,
        world_size: int,
        names: list[str] | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> Iterator[list[PartyShares]]:
        """Secret-share weights ``names`` (flat paths; default all) a chunk at a time: per chunk
        (about ``chunk_bytes`` of plaintext; 0: every piece on its own), one
        :class:`PartyShares` per computing party. A tensor shared in pieces spans chunks, one
        piece per chunk; the parties assemble it."""
        chunk: dict[str, list[PartyValue]] = {}
        size = 0
        for name in self._weights.names() if names is None else names:
            base, sep, block = name.partition("#")  # name#k: row block k of a table read in blocks
            for suffix, parts, plain in share(self._tensor(base, bool(sep)), int(block) if sep else None):
                key = self.PREFIX + base + suffix
                if key in chunk:
                    yield self._bundles(chunk, world_size)
                    chunk, size = {}, 0
                chunk[key] = parts
                size += plain
                if size >= chunk_bytes:
                    yield self._bundles(chunk, world_size)
                    chunk, size = {}, 0
        if chunk:
            yield self._bundles(chunk, world_size)

    def share(self, io: spu.Io, world_size: int) -> list[PartyShares]:
        """Secret-share every weight at once with ``io``: one :class:`PartyShares` per party."""
        share = lambda value: io.make_shares(np.asarray(value), libspu.Visibility.VIS_SECRET)  # noqa: E731
        return self._bundles({self.PREFIX + n: share(self._weights.get(n)) for n in self._weights.names()}, world_size)

    @staticmethod
    def _bundles(named: dict[str, list[PartyValue]], world_size: int) -> list[PartyShares]:
        return [PartyShares(r, {name: shares[r] for name, shares in named.items()}) for r in range(world_size)]


def _lazy_tree(params: dict) -> LazyParams:
    flat = flatten(params)
    return LazyParams(
        {k: tuple(np.shape(v)) for k, v in flat.items()}, {k: (lambda v=v: v) for k, v in flat.items()}, "weights"
    )


class Client:
    """Holds the plaintext inputs; the only role that reconstructs outputs."""

    def __init__(self, io: spu.Io, world_size: int):
        self._io = io
        self._world_size = world_size

    def share(self, secret: dict[str, np.ndarray], public: dict[str, np.ndarray]) -> list[PartyShares]:
        """Shares of the secret inputs and the public inputs as-is, one bundle per party."""
        sec = _split(self._io, secret, libspu.Visibility.VIS_SECRET, self._world_size)
        pub = _split(self._io, public, libspu.Visibility.VIS_PUBLIC, self._world_size)
        return [PartyShares(r, {**sec[r], **pub[r]}, frozenset(public)) for r in range(self._world_size)]

    def reconstruct(self, bundles: list[PartyShares]) -> dict[str, np.ndarray]:
        """Combine every party's output shares into the plaintext outputs."""
        if len(bundles) != self._world_size:
            raise ValueError(f"need shares from all {self._world_size} parties, got {len(bundles)}")
        names = bundles[0].values.keys()
        return {name: np.asarray(self._io.reconstruct([b.values[name] for b in bundles])) for name in names}
