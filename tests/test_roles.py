"""Roles stay apart, and the protocol configuration is validated.

Checks: a computing party receives only its own bundle of share objects (secret values are
fresh random shares, public ones are the lengths); the client never holds the weights on a
secure backend; on Ray the model owner shares the weights from its own process; outputs need
every party's shares. 2PC protocols (semi2k, cheetah) run on the sim backend with two parties
and agree with plaintext (fixed-point tolerance as in test_runtime).
"""

from __future__ import annotations

import numpy as np
import pytest
import spu.libspu as libspu

from puma import models, protocols, tasks
from puma.api import SecureModel
from puma.errors import PumaError
from puma.runtime import open_session, sharing
from puma.runtime.base import PlaintextSession
from puma.runtime.config import ProtocolConfig
from puma.runtime.roles import Client, ModelOwner, PartyShares
from puma.runtime.sim import SimMesh

EXACT = protocols.get("exact")


def _check(actual, expected, atol=2e-2, what="output"):
    err = np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64)))
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


def test_parties_receive_only_their_own_share_bundles(monkeypatch):
    received = []
    original = SimMesh.deliver

    def spy(self, bundles):
        received.append(list(bundles))  # deliver() empties the list it is handed
        return original(self, bundles)

    monkeypatch.setattr(SimMesh, "deliver", spy)
    with SecureModel.from_pretrained("gpt2-debug", backend="sim") as m:
        assert m.model.params is None  # the driver (client) never held the weights
        m.generate_ids([[5, 6, 7]], 2, use_cache=False)
    weights, first_input = received[0], received[1]
    for bundles in received:
        assert [b.rank for b in bundles] == [0, 1, 2]
        for b in bundles:
            assert isinstance(b, PartyShares)
            assert all(isinstance(v, (libspu.Share, sharing.Piece)) for v in b.values.values())
    assert all(name.startswith("p:") for name in weights[0].values)
    for bundles in received:
        for b in bundles:
            for piece in (v for v in b.values.values() if isinstance(v, sharing.Piece)):
                # a party gets what makes its pair (x_r, x_r+1) and no more: never two keys and x2
                held = sum(k is not None for k in piece.keys) + (piece.data is not None)
                assert held == 2 and (piece.data is None) == (b.rank == 0), (b.rank, piece.keys)
    assert set(first_input[0].values) == {"i:input_ids", "u:attention_mask", "u:position_ids"}
    assert first_input[0].public == {"u:attention_mask", "u:position_ids"}


def test_shares_are_fresh_randomness_and_need_every_party():
    io = __import__("spu").Io(3, ProtocolConfig().runtime_config(profile=False))
    client = Client(io, 3)
    secret = {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}
    a, b = client.share(secret, {}), client.share(secret, {})
    assert a[0].values["x"].share_chunks != b[0].values["x"].share_chunks
    np.testing.assert_allclose(client.reconstruct(a)["x"], secret["x"])
    with pytest.raises(ValueError, match="all 3 parties"):
        client.reconstruct(a[:2])


def test_owner_shares_weights_it_alone_holds():
    model = models.load("gpt2-debug")
    io = __import__("spu").Io(3, ProtocolConfig().runtime_config(profile=False))
    bundles = ModelOwner(model.params).share(io, 3)
    assert [b.rank for b in bundles] == [0, 1, 2]
    kernel = np.asarray(model.params["h_0"]["attn"]["c_attn"]["kernel"])
    back = Client(io, 3).reconstruct(bundles)["p:h_0/attn/c_attn/kernel"]
    assert back.shape == kernel.shape and np.max(np.abs(back - kernel)) <= 2.0**-18  # measured 3.8e-6
    # one party's share of a weight is not the weight: its ring elements (FM64: two per weight)
    # are uniformly random, not the fixed-point weights (|kernel| * 2^18 < 2^20)
    raw = b"".join(bundles[0].values["p:h_0/attn/c_attn/kernel"].share_chunks)
    ring = np.frombuffer(raw[len(raw) - 16 * kernel.size :], np.int64).astype(np.float64)
    assert np.max(np.abs(kernel)) * 2**18 < 2**20 and np.median(np.abs(ring)) > 2.0**55
    assert not any(hasattr(ModelOwner, m) for m in ("reconstruct", "collect", "receive"))


def test_ray_owner_runs_in_its_own_process():
    import os

    with SecureModel.from_pretrained("gpt2-debug", backend="ray") as m:
        assert m.model.params is None
        assert m.session.mesh.owner_pid != os.getpid()
        assert len(m.generate_ids([[1, 2]], 1).tokens[0]) == 1


@pytest.mark.parametrize("protocol", ["semi2k", "cheetah"])
def test_two_party_protocols(protocol):
    model = models.load("gpt2-debug")
    plain = PlaintextSession()
    plain.load_params(model.params)
    expected = tasks.causal_logits(plain, model, EXACT, [[5, 6, 7]]).outputs
    with open_session("sim", protocol=protocol) as session:
        session.load_params(model.params)
        result = tasks.causal_logits(session, model, EXACT, [[5, 6, 7]])
    assert session.world_size == 2 and len(result.cost.per_party) == 2
    assert all(p.bytes_sent > 0 for p in result.cost.per_party)
    _check(result.outputs, expected, what=protocol)


def test_protocol_settings_are_validated():
    with pytest.raises(PumaError, match="unknown protocol"):
        ProtocolConfig("aby4")
    with pytest.raises(PumaError, match="out of range"):
        ProtocolConfig(fxp_bits=40)
    cfg = ProtocolConfig(field="FM128", fxp_bits=40).runtime_config()
    assert cfg.fxp_fraction_bits == 40 and cfg.enable_pphlo_profile
    assert ProtocolConfig().compiler_options().enable_optimize_denominator_with_broadcast
    with pytest.raises(PumaError, match="unknown SPU runtime option"):
        ProtocolConfig(runtime=(("no_such_option", 1),)).runtime_config()
    with_exp = ProtocolConfig().with_settings(protocols.SpuSettings(runtime=(("fxp_exp_mode", "EXP_TAYLOR"),)))
    assert with_exp.runtime_config().fxp_exp_mode == libspu.RuntimeConfig.ExpMode.EXP_TAYLOR
