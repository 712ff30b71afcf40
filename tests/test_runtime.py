"""Secure runtime: the sim, nodes and ray backends agree with plaintext and with each other.

Oracle: the plaintext (``jax.jit``) run of the same program with the exact ops set. Under SPU
(ABY3, FM64, 18 fraction bits) the exact functions are evaluated with SPU's own fixed-point
approximations; on the debug presets (O(1) logits) the measured max error is ~3e-3, asserted
at FXP_ATOL = 2e-2. Greedy tokens must be identical.

One shared base run per backend (module fixtures), one ``_check`` helper.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from puma import models, protocols, tasks
from puma.api import SecureModel
from puma.runtime import open_session
from puma.runtime.base import PlaintextSession
from tests.parties import local_parties, write_topology

FXP_ATOL = 2e-2
EXACT = protocols.get("exact")
IDS = [[5, 6, 7, 8, 9, 10], [3, 4, 11]]


def _check(actual, expected, atol=FXP_ATOL, what="output"):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.max(np.abs(actual - expected))
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    path = tmp_path_factory.mktemp("topo") / "3pc.yaml"
    return write_topology(path)


@pytest.fixture(scope="module")
def parties(topology, tmp_path_factory):
    with local_parties(topology, str(tmp_path_factory.mktemp("party-logs"))) as proc:
        yield proc


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module (sessions join it instead of starting their own)."""
    import warnings

    import ray

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        ray.init(include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module", params=["sim", "nodes", "ray"])
def backend(request):
    if request.param == "nodes":
        request.getfixturevalue("parties")
        return "nodes", {"config": request.getfixturevalue("topology")}
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    return request.param, {}


def _plain(model):
    session = PlaintextSession()
    session.load_params(model.params)
    return session


def _secure(model, backend):
    name, options = backend
    if name == "nodes":  # the parties serve published models: publish as the owner, run as a client
        return SecureModel.from_pretrained(model.source, backend=name, approx="exact", **options).session
    session = open_session(name, spu_settings=EXACT.spu, **options)
    session.load_params(model.params)
    return session


@pytest.mark.parametrize("preset", ["gpt2-debug", "llama-debug"])
def test_causal_logits_match_plaintext(backend, preset):
    model = models.load(preset)
    expected = tasks.causal_logits(_plain(model), model, EXACT, IDS).outputs
    with _secure(model, backend) as session:
        result = tasks.causal_logits(session, model, EXACT, IDS)
    _check(result.outputs, expected, what=f"{preset} logits on {backend[0]}")
    _check_cost(result.cost, runs=1)


def test_bert_heads_match_plaintext(backend):
    model = models.load("bert-debug-cls")
    ids = np.array([[2, 7, 9, 4, 1], [2, 8, 3, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    types = np.array([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]], np.int32)
    with _secure(model, backend) as session:
        for head in ("classify", "mean"):
            got = tasks.encode(session, model, EXACT, ids, types, mask, head)
            want = tasks.encode(_plain(model), model, EXACT, ids, types, mask, head)
            _check(got.outputs, want.outputs, what=f"bert {head} on {backend[0]}")


def test_stories260k_greedy_tokens_match_plaintext(backend, stories_gguf):
    name, options = backend
    expected = SecureModel.from_pretrained(stories_gguf).generate("Once upon a time", 4, use_cache=False)
    with SecureModel.from_pretrained(stories_gguf, backend=name, approx="exact", **options) as m:
        result = m.generate("Once upon a time", 4, use_cache=False, reveal="logits")
    assert result.tokens == expected.tokens
    _check_cost(result.cost, runs=4)


def _check_cost(cost, runs):
    """Every party sent bytes; totals are the sums over parties; per-op bytes add up too."""
    report = cost.to_dict()
    json.dumps(report)
    assert report["runs"] == runs and len(report["per_party"]) == 3
    for party in report["per_party"]:
        assert party["bytes_sent"] > 0 and party["send_actions"] > 0 and party["seconds"] > 0
        assert party["runs"] == runs
    assert report["total_bytes_sent"] == sum(p["bytes_sent"] for p in report["per_party"])
    assert report["total_send_actions"] == sum(p["send_actions"] for p in report["per_party"])
    assert sum(op["bytes_sent"] for op in report["per_op"].values()) == report["total_bytes_sent"]
    assert sum(p["bytes_recv"] for p in report["per_party"]) == report["total_bytes_sent"]


@functools.lru_cache(maxsize=None)
def _plaintext_tokens(source: str) -> list[int]:
    """The oracle of the CLI runs below: 2 greedy tokens in plaintext with the exact functions."""
    return SecureModel.from_pretrained(source, approx="exact").generate("Once upon a time", 2).tokens[0]


def test_cli_json_stats(backend, capsys, stories_gguf):
    from puma import cli

    name, options = backend
    argv = [
        "generate",
        "-m",
        stories_gguf,
        "-p",
        "Once upon a time",
        "-n",
        "2",
        "--backend",
        name,
        "--json",
        "--approx",
        "exact",
    ]
    if "config" in options:
        argv += ["--config", options["config"]]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    stats = out["stats"]
    assert out["backend"] == name and out["tokens"] == _plaintext_tokens(stories_gguf)
    assert {"per_party", "total_bytes_sent", "total_send_actions", "wall_s"} <= set(stats)
    assert stats["total_bytes_sent"] == sum(p["bytes_sent"] for p in stats["per_party"]) > 0


def _profile_block(rng, rank: int, run: str) -> list[str]:
    """Party ``rank``'s profile block in SPU's log format as the sim backend makes it: random op
    costs by decreasing duration, and ``rank`` executions of the stagger marker."""
    from puma.runtime.sim import MARKER_OP

    prefix = "2026-11-22 04:25:35.940 [info] [api.cc:printProfilingData:223] "
    ops = list(rng.choice(["pphlo.dot", "pphlo.less", "pphlo.multiply", "pphlo.select", "pphlo.reduce"], 4, False))
    counts = [3] * len(ops)
    costs = rng.integers(1, 10**6, (len(ops), 4))
    if rank:
        ops, counts, costs = ops + [MARKER_OP], counts + [rank], np.vstack([costs, np.zeros((1, 4), int)])
    durations = rng.uniform(0.01, 5.0, len(ops))
    order = np.argsort(-durations)
    lines = [
        f"{prefix}[Profiling] SPU execution {run}@r{rank} completed, input processing took 0.0003s, "
        f"execution took {durations.sum():.6f}s, output processing took 3e-05s, total time 1.0s.",
        f"{prefix}HLO profiling: total time {durations.sum():.6f}",
    ]
    for i in order:
        sb, rb, sa, ra = costs[i]
        lines.append(
            f"{prefix}- {ops[i]}, executed {counts[i]} times, duration {durations[i]:.9f}s, send bytes {sb} "
            f"recv bytes {rb}, send actions {sa}, recv actions {ra}"
        )
    sb, rb, sa, ra = costs.sum(0)
    lines.append(f"{prefix}Link details: total send bytes {sb}, recv bytes {rb}, send actions {sa}, recv actions {ra}")
    return lines


def _interleave(rng, blocks, start_after: int | None) -> list[str]:
    """The blocks' lines merged in a random order that keeps each block's own order; with
    ``start_after``, block r begins only after block r-1 has written that many lines (the sim
    backend's stagger), else anywhere."""
    cursors, mixed = [0] * len(blocks), []
    while any(c < len(b) for c, b in zip(cursors, blocks)):
        ready = [
            r
            for r in range(len(blocks))
            if cursors[r] < len(blocks[r]) and (start_after is None or r == 0 or cursors[r - 1] >= start_after)
        ]
        r = rng.choice(ready)
        mixed.append(blocks[r][cursors[r]])
        cursors[r] += 1
    return mixed


@pytest.mark.parametrize("start_after", [None, 4, 6])
def test_interleaved_profile_blocks_are_untangled_or_refused(start_after):
    """Parties sharing one log (sim) may write their blocks at once. From any interleaving of
    their lines the parser recovers every party's block exactly or refuses (never a wrong split);
    once each block starts a few lines after the previous one, it always recovers them.
    Oracle: the blocks as written."""
    from puma.runtime.profiles import parse_profiles
    from puma.runtime.sim import names_its_party

    rng = np.random.default_rng(0)
    recovered = 0
    for trial in range(300):
        blocks = [_profile_block(rng, r, f"run{trial}") for r in range(3)]
        expected = {b.name: b for b in parse_profiles("\n".join(line for block in blocks for line in block))}
        try:
            got = parse_profiles("\n".join(_interleave(rng, blocks, start_after)), accept=names_its_party)
        except ValueError:
            assert start_after is None, "a staggered interleaving was refused"
            continue
        recovered += 1
        assert {b.name for b in got} == set(expected)
        for block in got:
            assert block.ops == expected[block.name].ops and block.link == expected[block.name].link
    assert recovered >= (150 if start_after is None else 300)


def test_a_taken_link_port_fails_with_the_words_ray_retries_on():
    """A party's link port can be taken between the actor finding it free and brpc listening on
    it (it happened in CI); yacl's error for that is what :class:`RayMesh` retries on."""
    import socket

    import spu.libspu as libspu

    from puma.runtime import ray_mesh
    from puma.runtime.party import link_desc

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        desc = link_desc([("party0", f"127.0.0.1:{port}"), ("party1", "127.0.0.1:1")], 1, 1)
        with pytest.raises(RuntimeError, match=ray_mesh._PORT_TAKEN):
            libspu.link.create_brpc(desc, 0)


def test_ray_opens_new_parties_when_a_link_port_was_taken(ray_cluster, monkeypatch, caplog):
    """The first parties fail as a taken port makes them fail; the session starts new ones on
    new ports and computes the right logits."""
    from puma.errors import PumaError
    from puma.runtime import ray_mesh

    real, attempts = ray_mesh.RayMesh._open_parties, []

    def taken_once(self, *args):
        attempts.append(len(self.actors))
        if len(attempts) == 1:
            real(self, *args)  # real parties with open links, which the retry must kill
            raise PumaError(f"ray: party 0 failed during open links: [brpc_link.cc:106] {ray_mesh._PORT_TAKEN}")
        real(self, *args)

    monkeypatch.setattr(ray_mesh.RayMesh, "_open_parties", taken_once)
    model = models.load("llama-debug")
    expected = tasks.causal_logits(_plain(model), model, EXACT, IDS).outputs
    with open_session("ray", spu_settings=EXACT.spu) as session:
        session.load_params(model.params)
        result = tasks.causal_logits(session, model, EXACT, IDS)
    assert attempts == [0, 0], f"each attempt starts from no parties: {attempts}"
    assert "new parties, new ports" in caplog.text
    _check(result.outputs, expected, what="llama-debug logits after a retried open")
