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
from typing import Iterator

import numpy as np
import spu
import spu.libspu as libspu

from puma.models.loading import flatten


@dataclasses.dataclass
class PartyShares:
    """What one computing party receives: named values, each a ``libspu.Share``.

    Secret values are this party's shares only; public values (``public`` names) are the same at
    every party. ``rank`` says whose bundle this is.
    """

    rank: int
    values: dict[str, libspu.Share]
    public: frozenset[str] = frozenset()

    @property
    def nbytes(self) -> int:
        return sum(len(s.meta) + sum(len(c) for c in s.share_chunks) for s in self.values.values())


def _split(io: spu.Io, named: dict[str, np.ndarray], visibility, world_size: int) -> list[dict]:
    per_party: list[dict] = [{} for _ in range(world_size)]
    for name, value in named.items():
        for rank, share in enumerate(io.make_shares(np.asarray(value), visibility)):
            per_party[rank][name] = share
    return per_party


#: Plaintext bytes of weights shared and delivered at a time.
CHUNK_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class OwnerSpec:
    """Where the model owner reads its weights: a source for :func:`puma.models.load`."""

    source: str
    overrides: tuple = ()
    seed: int = 0


class ModelOwner:
    """Holds the model's plaintext weights; gives each computing party its shares of them."""

    PREFIX = "p:"

    def __init__(self, params: dict):
        self._params = params

    @classmethod
    def from_spec(cls, spec: OwnerSpec) -> "ModelOwner":
        """Load the weights named by ``spec`` (in the owner's own process)."""
        from puma.models import load

        return cls(load(spec.source, overrides=dict(spec.overrides) or None, seed=spec.seed).params)

    def names(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Parameter names as the parties know them, with shapes and dtypes (public metadata)."""
        return {
            self.PREFIX + k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in flatten(self._params).items()
        }

    def share_chunks(self, io: spu.Io, world_size: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[list[PartyShares]]:
        """Secret-share the weights a chunk at a time: per chunk of tensors (about ``chunk_bytes``
        of plaintext), one :class:`PartyShares` per computing party. Delivering chunk by chunk
        keeps the shares in flight small (a share is several times its plaintext)."""
        chunk: dict[str, np.ndarray] = {}
        size = 0
        for name, value in flatten(self._params).items():
            chunk[self.PREFIX + name] = value
            size += np.asarray(value).nbytes
            if size >= chunk_bytes:
                yield self._bundles(io, world_size, chunk)
                chunk, size = {}, 0
        if chunk or size == 0:
            yield self._bundles(io, world_size, chunk)

    def share(self, io: spu.Io, world_size: int) -> list[PartyShares]:
        """Secret-share every weight at once: one :class:`PartyShares` per computing party."""
        return self._bundles(io, world_size, {self.PREFIX + k: v for k, v in flatten(self._params).items()})

    @staticmethod
    def _bundles(io, world_size: int, named: dict) -> list[PartyShares]:
        return [
            PartyShares(r, vals) for r, vals in enumerate(_split(io, named, libspu.Visibility.VIS_SECRET, world_size))
        ]


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
