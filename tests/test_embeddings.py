"""The three secure embeddings, their cost model and the network-aware choice.

Oracles: ``table[ids]`` in numpy (every embedding is exact under SPU up to the table's
encoding), secure runs at a shape the cost model was not fitted to (its bytes and rounds must be
predicted within 15 %), hand-made cost models whose cheapest embedding per network is known,
and the plaintext model for runs that pick an embedding by network.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from puma.protocols import embeddings as E

from puma import protocols
from puma.bench import embeddings as bench
from puma.cli import main
from puma.network import NETWORKS, Network
from puma.runtime import open_session

SHAPE = (16, 3072, 384)  # inside the fitted grid, not one of its points


@pytest.fixture(scope="module")
def measured():
    with open_session("sim") as session:
        return {kind: bench.measure(session, kind, *SHAPE) for kind in E.KINDS}


@pytest.mark.parametrize("kind", E.KINDS)
def test_every_embedding_is_exact_and_its_cost_model_predicts_it(measured, kind):
    cell = measured[kind]
    assert cell["max_abs_error"] <= 4e-6  # half a unit of 2^-18 (checked against table[ids])
    model = E.COSTS[kind]
    assert model.bytes_sent(*SHAPE) == pytest.approx(cell["bytes_sent"], rel=0.15)
    assert model.rounds(*SHAPE) == pytest.approx(cell["rounds"], rel=0.15)
    assert model.client_upload(*SHAPE) == pytest.approx(cell["client_upload"], rel=0.15, abs=64)


def test_the_choice_follows_the_network(monkeypatch):
    chatty = E.EmbeddingCost(E.Linear(), E.Linear(t=1000.0), E.Linear(), E.Linear())  # 1000 rounds/token
    bulky = E.EmbeddingCost(E.Linear(tv=100.0), E.Linear(const=10.0), E.Linear(), E.Linear())  # 100 B/entry
    upload = E.EmbeddingCost(E.Linear(), E.Linear(const=10.0), E.Linear(), E.Linear(tv=400.0))
    monkeypatch.setattr(E, "COSTS", {"gather": chatty, "equality": bulky, "client-onehot": upload})
    # 32 tokens x 30000 entries: gather 32 s at 1 ms; equality 96 MB / 3 per party; upload 384 MB
    lan = Network("custom", 5e9, 1e-3)
    assert E.cheapest(32, 30000, 768, lan) == "equality"
    assert E.cheapest(32, 30000, 768, Network("custom", 5e9, 1e-6)) == "gather"  # no latency: rounds are free
    ops = E.for_network(protocols.get("puma-fast"), 30000, 768, lan)
    assert ops.name == "puma-fast+equality" and not ops.plan.client_onehot and E.kind_of(ops) == "equality"
    assert E.with_embedding(protocols.get("puma-fast"), "client-onehot") is protocols.get("puma-fast")
    with pytest.raises(ValueError, match="unknown embedding"):
        E.with_embedding(protocols.get("puma"), "hash")


def test_cli_network_picks_the_embedding_and_matches_plaintext(capsys):
    assert main(["embed", "-m", "bert-debug", "--ids", "5,17,2,9", "--backend", "plaintext", "--json"]) == 0
    plain = np.array(json.loads(capsys.readouterr().out)["embeddings"])
    assert main(["embed", "-m", "bert-debug", "--ids", "5,17,2,9", "--network", "wan", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    kind = E.cheapest(E.NOMINAL_TOKENS, 128, 32, NETWORKS["wan"])
    fast = protocols.get("puma-fast")
    assert payload["approx"] == E.with_embedding(fast, kind).name
    # puma-fast under MPC against exact plaintext, unit vectors: measured 9.5e-4 (3 runs)
    assert np.abs(np.array(payload["embeddings"]) - plain).max() < 3e-3


def test_a_bad_network_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["embed", "-m", "bert-debug", "--ids", "5,17", "--network", "fast"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'fast' is not a network: use lan, wan or BANDWIDTH,RTT" in err
