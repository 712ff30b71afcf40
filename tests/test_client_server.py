"""Client-server mode: the model owner's own party and the client's own party, nothing else.

The owner serves stories260K with ``puma owner serve`` (a subprocess holding the weights file);
clients run jobs with the manifest only. Each test checks a value: tokens against plaintext, the
shares the owner's party received against the client's inputs, what the client received
against the owner's store (nothing of a weight), refusals by their message.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest
import spu
import spu.libspu as libspu

from puma.api import SecureModel
from puma.manifest import read_manifest
from puma.runtime import certs, commands, sharing, wire
from puma.runtime.client_server import ClientServerMesh
from puma.runtime.commands import read_share, share_path
from puma.runtime.config import Topology
from puma.runtime.messages import Message
from puma.runtime.nodes import NodesMesh
from tests.parties import client_server_topology, descendants, owner_serving, wait_gone

PROMPT = "Once upon a time"
IDLE_S = 8


def _cheetah_io(colocated: bool = False) -> spu.Io:
    config = libspu.RuntimeConfig(protocol=libspu.ProtocolKind.CHEETAH, field=libspu.FieldType.FM64)
    config.fxp_fraction_bits = 18
    config.experimental_enable_colocated_optimization = colocated
    return spu.Io(2, config)


@pytest.fixture(scope="module")
def served(tmp_path_factory, stories_gguf):
    """The owner serving stories260K: (topology path, manifest path, root folder)."""
    root = tmp_path_factory.mktemp("client-server")
    topo = client_server_topology(root / "cs.yaml", job_idle_s=IDLE_S, clients=("client", "mallory"))
    manifest = str(root / "manifest.json")
    weights = root / "owner-weights.gguf"
    shutil.copyfile(stories_gguf, weights)
    with owner_serving(topo, str(weights), manifest, str(root)) as proc:
        os.remove(weights)  # published into the owner's party's store: no one needs the file any more
        yield topo, manifest, root
        started = [proc.pid, *descendants(proc.pid)]
    assert wait_gone(started) == [], "puma owner serve left processes behind"


@pytest.fixture(scope="module")
def plaintext(stories_gguf):
    return SecureModel.from_pretrained(stories_gguf).generate(PROMPT, 3)


def test_two_party_pieces_are_shares_and_owner_private_pieces_leave_the_client_nothing():
    """Two computing parties (2pc.yaml): x0 (data) + x1 (AES stream of the key) reconstructs the
    tensor within the fixed-point step (2^-18 = 3.8e-6; measured 3.8e-6), party 1 is sent a key.
    Client-server (owner_private): party 0's piece is the value as its private ``Priv2k``, party 1
    is sent nothing and its placeholder is zeros, byte for byte what :func:`sharing.placeholder`
    builds alone; SPU reconstructs the value from the pair."""
    x = np.random.default_rng(0).normal(size=(5, 37)).astype(np.float32) * 100
    shares = sharing.make_shares(x, "FM64", 18, chunk_bytes=64, protocol="cheetah")
    assert np.abs(_cheetah_io().reconstruct(shares) - x).max() <= 2**-18
    for parts in sharing.pieces(x, "FM64", 18, chunk_bytes=64, protocol="cheetah"):
        assert parts[1].data is None and len(parts[1].keys) == 1 and parts[1].keys[0]  # a key, never data
    assembler, delivered = sharing.Assembler(), None
    for parts in sharing.pieces(x, "FM64", 18, chunk_bytes=64, protocol="cheetah", owner_private=True):
        assert parts[1].nbytes == len(parts[1].meta) and parts[0].keys == (None,)  # party 1: no data, no key
        delivered = assembler.add("x", parts[1]) or delivered
    alone = sharing.placeholder(x.shape, "FM64", chunk_bytes=64)
    assert alone.meta == delivered.meta and list(alone.share_chunks) == list(delivered.share_chunks)
    assert b"Priv2k<FM64,0>" in alone.meta
    total, content = x.size * 8, b""
    for k, chunk in enumerate(alone.share_chunks):  # ValueChunkProto: a header, then the ring words
        size = min(64, total - 64 * k)
        head = sharing._chunk_head(total, 64 * k, size)
        assert chunk[: len(head)] == head and len(chunk) == len(head) + size
        content += chunk[len(head) :]
    assert len(content) == total and content == bytes(total)
    owner = sharing.make_shares(x, "FM64", 18, chunk_bytes=64, protocol="cheetah", owner_private=True)
    assert np.abs(_cheetah_io(colocated=True).reconstruct(owner) - x).max() <= 2**-18
    with pytest.raises(ValueError, match="only a two-party protocol"):
        next(sharing.pieces(x, "FM64", 18, protocol="aby3", owner_private=True))


def test_generation_equals_plaintext_and_the_owner_party_receives_no_input_or_output(served, plaintext, monkeypatch):
    topo, manifest, _ = served
    to_owner: list[Message] = []
    inputs: list[list] = []
    exchanged, call = NodesMesh._exchanged, ClientServerMesh.call

    def spy_exchanged(self, rank, message, reply):
        to_owner.append(message)
        return exchanged(self, rank, message, reply)

    def spy_call(self, command, per_party):
        if command == "inputs":
            inputs.append([p["bundle"] for p in per_party])
        return call(self, command, per_party)

    monkeypatch.setattr(NodesMesh, "_exchanged", spy_exchanged)
    monkeypatch.setattr(ClientServerMesh, "call", spy_call)
    with SecureModel.from_pretrained(manifest, backend="nodes", config=topo) as m:
        ids = m.model.tokenizer(PROMPT)["input_ids"]
        result = m.generate(PROMPT, 3)
    assert result.tokens == plaintext.tokens
    # the owner's party's share of the input (the one-hot rows of the ids) is a share: with the
    # client's it makes the input, alone it is not it
    first = inputs[0]
    name = next(n for n in first[0].values if n.startswith("i:"))
    together = _cheetah_io().reconstruct([first[0].values[name], first[1].values[name]])
    onehot = together.reshape(-1, m.model.config.vocab_size)[-len(ids) :]  # [prompt left-padded to a bucket, vocab]
    assert onehot.argmax(-1).tolist() == ids and set(np.unique(onehot).tolist()) == {0.0, 1.0}
    alone = _cheetah_io().reconstruct([first[0].values[name]] * 2).reshape(-1, onehot.shape[1])[-len(ids) :]
    assert not np.array_equal(alone.argmax(-1), onehot.argmax(-1))
    # what the owner's party was given: commands of the table, never the input in any encoding
    assert {msg.op for msg in to_owner} <= {"hello", "job", "client_manifest", "inputs", "run_task", "outputs", "free"}
    needles = [np.asarray(ids, dtype).tobytes() for dtype in ("<i4", "<i8")]
    needles += [row.tobytes() for row in (onehot * 2**18).astype("<i8")]
    for msg in to_owner:
        assert not any(n in buf for buf in msg.buffers for n in needles), msg.op
        if msg.op == "outputs":
            assert msg.buffers == []  # it is asked for its output shares, it is handed nothing


def _job(topology: Topology, manifest: str, name: str = "client") -> wire.Channel:
    """A client's job at the owner's party, opened by hand (as an attacker would)."""
    tls = topology.tls
    cert, key = tls.client(name)
    host, port = topology.parties[0].control_host_port
    channel = wire.connect(host, port, certs.client_context(cert, key, tls.ca), timeout=10)
    hello = {"protocol": {"protocol": "cheetah", "field": "FM64"}, "world_size": 2, "rank": 0}
    channel.send(commands.encode("hello", hello))
    greeting = channel.recv().args["value"]["greeting"]
    body, _, _ = read_manifest(manifest)
    channel.send(Message("job", {"model": body["model_id"], "ticket": None, "peers": [greeting]}))
    reply = channel.recv()
    while reply.op == "queued":  # the previous job is still ending
        reply = channel.recv()
    assert reply.op == "ok", reply
    return channel


def _ask(channel: wire.Channel, message: Message) -> Message:
    channel.send(message)
    return channel.recv()


def test_the_client_gets_nothing_of_a_weight(served, stories_gguf):
    """client_manifest: the signed manifest, no buffer and no key; the owner's party keeps each
    weight as its own private value (its store holds the weight itself, ``Priv2k`` of rank 0),
    so there is no share a client could complete. No command hands out a weight."""
    from puma.models import load

    topo, manifest, root = served
    topology = Topology.from_yaml(topo)
    body, _, _ = read_manifest(manifest)
    mid = body["model_id"]
    channel = _job(topology, manifest)
    reply = _ask(channel, commands.encode("client_manifest", {"model": mid}))
    doc = reply.args["value"]
    assert set(doc) == {"manifest", "signature"} and reply.buffers == []
    assert doc["manifest"] == body
    name = "embed_tokens/embedding"
    w = np.asarray(load(stories_gguf, lazy=True).lazy.get(name), np.float32)
    owners = read_share(share_path(os.path.join(topology.store, "provider", mid, "weights"), name))
    assert b"Priv2k<FM64,0>" in owners.meta
    mine = sharing.placeholder(w.shape, "FM64")
    assert np.abs(_cheetah_io(colocated=True).reconstruct([owners, mine]) - w).max() <= 2**-18
    answer = _ask(channel, commands.encode("collect", {"names": [f"p:{mid}:{name}"]}))
    assert answer.op == "error" and "collect is not a command a client may give" in answer.args["message"], answer
    channel.close()
    channel = _job(topology, manifest)
    answer = _ask(channel, commands.encode("outputs", {"names": [f"p:{mid}:{name}"]}))
    assert answer.op == "error" and "not an output of the last run" in answer.args["message"], answer
    channel.close()


def test_the_owner_policy_holds_and_a_silent_client_is_ended(served, plaintext):
    """A task the policy does not allow is refused; a client that opens a job and goes silent
    is ended after job_idle_s (told so in one line) and the next client is served."""
    topo, manifest, _ = served
    topology = Topology.from_yaml(topo)
    mid = read_manifest(manifest)[0]["model_id"]
    channel = _job(topology, manifest)
    task = {"model": mid, "approx": "puma-fast", "spec": ["logits", {}], "slot": "-", "bind": {}}
    answer = _ask(channel, commands.encode("run_task", {**task, "secret": {}, "public": {}}))
    assert answer.op == "error" and "does not allow the task 'logits'" in answer.args["message"], answer
    channel.close()
    idle = _job(topology, manifest, "mallory")  # holds the owner's party, then says nothing
    served_next: list = []

    def honest() -> None:  # queues behind mallory
        with SecureModel.from_pretrained(manifest, backend="nodes", config=topo) as m:
            served_next.append(m.generate(PROMPT, 3).tokens)

    thread = threading.Thread(target=honest, daemon=True)
    thread.start()
    time.sleep(IDLE_S + 2)
    answer = _ask(idle, commands.encode("free", {"slot": "x"}))
    assert answer.op == "error" and answer.args["kind"] == "idle" and "job_idle_s" in answer.args["message"]
    idle.close()
    thread.join(600)  # hang guard: the job runs in about a minute here
    assert served_next == [plaintext.tokens]


def test_sim_runs_the_client_server_programs_in_one_process(stories_gguf, plaintext):
    """``--backend sim -c <client-server topology>``: both parties as threads (development), the
    same cheetah programs, the same tokens."""
    topo = os.path.join(os.path.dirname(__file__), "..", "configs", "client-server.yaml")
    with SecureModel.from_pretrained(stories_gguf, backend="sim", config=topo) as m:
        result = m.generate(PROMPT, 3)
        assert m.session.protocol_config.protocol == "cheetah" and m.session.protocol_config.owner_private
    assert result.tokens == plaintext.tokens
    assert [p.rank for p in result.cost.per_party] == [0, 1]
