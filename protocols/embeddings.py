"""The three secure embeddings, their cost model, and the cheapest one on a given network.

Every approximation set embeds secret token ids one way; all three ways are exact (up to the
table's fixed-point encoding) and differ only in cost:

- ``gather``: ``table[ids]`` by SPU's secret-index gather (:func:`puma.protocols.exact.embed`):
  few bytes, but rounds that grow with the tokens.
- ``equality``: one secret-public equality per (token, vocabulary entry) builds the one-hot
  rows, which multiply the table (PUMA §4.4, :func:`puma.protocols.puma.embed`): a fixed number
  of rounds, bytes that grow with tokens x vocabulary.
- ``client-onehot``: the client, which knows its ids, makes the one-hot rows and shares them
  (:func:`puma.protocols.fast.embed`): no comparisons, a fixed number of rounds; the client
  uploads tokens x vocabulary shares.

Cost model (:class:`EmbeddingCost`), per embedding, for T tokens, vocabulary V and width D:
bytes sent by all parties, send actions of the busiest party (rounds), compute seconds and the
client's upload, each ``a * T*V + b * T*D + c * T + d`` (compute also ``+ e * T*V*D``: the
one-hot product's local work), fitted by least squares to runs of
``puma bench embeddings`` (ABY3, FM64, 18 fraction bits, ``sim`` on this 2-core machine; the
fit and its error at the model shapes are in ``bench-results/embeddings.json``: bytes and
rounds exact on the grid; at the model shapes gather and equality bytes within 6 % and rounds
within 44 %, while the client-made one-hot rows, whose large products SPU splits, are off by up
to 2x in bytes and 13x in rounds; compute seconds within a factor of 4). Modelled time on a
network (as :mod:`puma.network`): compute + rounds x RTT + busiest party's bytes (a third
of the total) x 8 / bandwidth + client upload x 8 / bandwidth.
"""

from __future__ import annotations

import dataclasses

from puma.protocols.base import Ops

from puma.network import Network, estimate

KINDS = ("gather", "equality", "client-onehot")


@dataclasses.dataclass(frozen=True)
class Linear:
    """a * T*V + b * T*D + c * T + d + e * T*V*D."""

    tv: float = 0.0
    td: float = 0.0
    t: float = 0.0
    const: float = 0.0
    tvd: float = 0.0

    def __call__(self, tokens: int, vocab: int, dim: int) -> float:
        terms = self.tv * tokens * vocab + self.td * tokens * dim + self.t * tokens + self.const
        return max(0.0, terms + self.tvd * tokens * vocab * dim)


@dataclasses.dataclass(frozen=True)
class EmbeddingCost:
    bytes_sent: Linear
    rounds: Linear
    compute_s: Linear
    client_upload: Linear

    def seconds(self, tokens: int, vocab: int, dim: int, net: Network) -> float:
        """Modelled wall seconds on ``net`` (:func:`puma.network.estimate`, the busiest party
        sending a third of the bytes, the client's upload over the same bandwidth)."""
        moved = self.bytes_sent(tokens, vocab, dim) / 3.0 + self.client_upload(tokens, vocab, dim)
        return estimate(self.compute_s(tokens, vocab, dim), self.rounds(tokens, vocab, dim), moved, net)


#: Fitted by ``puma bench embeddings`` (see the module doc); refit when SPU or the ops change.
COSTS = {
    "gather": EmbeddingCost(
        bytes_sent=Linear(tv=0.1828, td=112.1, t=7767.0, const=595.6, tvd=0.0),
        rounds=Linear(tv=0.001865, td=0.001013, t=102.9, const=38.08, tvd=0.0),
        compute_s=Linear(tv=6.101e-07, td=0.0, t=0.0, const=0.2548, tvd=6.635e-09),
        client_upload=Linear(tv=0.0, td=0.0, t=48.0, const=99.0, tvd=0.0),
    ),
    "equality": EmbeddingCost(
        bytes_sent=Linear(tv=262.0, td=24.0, t=0.0, const=0.0, tvd=0.0),
        rounds=Linear(tv=0.0, td=0.0, t=0.0, const=10.17, tvd=0.0),
        compute_s=Linear(tv=0.0, td=0.0, t=0.0, const=1.309, tvd=7.604e-09),
        client_upload=Linear(tv=0.0, td=0.0, t=48.0, const=99.0, tvd=0.0),
    ),
    "client-onehot": EmbeddingCost(
        bytes_sent=Linear(tv=2.467e-16, td=52.0, t=0.0, const=0.0, tvd=0.0),
        rounds=Linear(tv=0.0, td=2.13e-22, t=1.73e-19, const=3.0, tvd=0.0),
        compute_s=Linear(tv=0.0, td=0.0, t=0.0, const=8.395, tvd=8.048e-09),
        client_upload=Linear(tv=48.0, td=8.95e-05, t=0.0, const=109.7, tvd=0.0),
    ),
}


def with_embedding(ops: Ops, kind: str) -> Ops:
    """``ops`` with its embedding replaced by ``kind`` (named ``<set>+<kind>``; the set itself
    when it already embeds that way)."""
    from puma.protocols import exact, fast, puma

    functions = {"gather": (exact.embed, False), "equality": (puma.embed, False), "client-onehot": (fast.embed, True)}
    if kind not in functions:
        raise ValueError(f"unknown embedding {kind!r}; choose one of {', '.join(KINDS)}")
    embed, client_onehot = functions[kind]
    if ops.embed is embed and ops.plan.client_onehot == client_onehot:
        return ops
    return dataclasses.replace(ops, name=f"{ops.name}+{kind}", embed=embed).with_plan(client_onehot=client_onehot)


def kind_of(ops: Ops) -> str:
    """Which of the three embeddings ``ops`` uses."""
    from puma.protocols import exact, fast, puma

    if ops.plan.client_onehot:
        return "client-onehot"
    return {exact.embed: "gather", puma.embed: "equality", fast.embed: "client-onehot"}.get(ops.embed, "custom")


def modelled(tokens: int, vocab: int, dim: int, net: Network) -> dict[str, float]:
    """Modelled seconds of each embedding for T tokens, vocabulary V and width D on ``net``."""
    return {kind: COSTS[kind].seconds(tokens, vocab, dim, net) for kind in KINDS}


def cheapest(tokens: int, vocab: int, dim: int, net: Network) -> str:
    """The embedding with the smallest modelled time on ``net``."""
    times = modelled(tokens, vocab, dim, net)
    return min(times, key=times.get)


#: Tokens the choice is made for when a model is loaded (every term but the fixed rounds
#: grows with the tokens, so the ranking barely depends on them).
NOMINAL_TOKENS = 32


def for_network(ops: Ops, vocab: int, dim: int, net: Network) -> Ops:
    """``ops`` with the embedding that is cheapest on ``net`` for a table of ``vocab`` x ``dim``
    at :data:`NOMINAL_TOKENS` tokens."""
    return with_embedding(ops, cheapest(NOMINAL_TOKENS, vocab, dim, net))
