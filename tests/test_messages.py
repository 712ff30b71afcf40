"""The wire schema: typed frames and the command table's arguments, checked before use.

Oracles: the values themselves (shares reconstruct to the plaintext through ``spu.Io`` after a
round trip), and exact refusals for frames and arguments that break the schema.
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import spu
import spu.libspu as libspu

from puma.runtime import commands, messages, sharing
from puma.runtime.config import ProtocolConfig
from puma.runtime.messages import Message, MessageError
from puma.runtime.roles import Client, PartyShares


def _roundtrip(message: Message) -> Message:
    data = io.BytesIO(b"".join(messages.encode(message)))
    return messages.receive(lambda n: data.read(n))


def test_shares_and_pieces_survive_the_wire():
    config = ProtocolConfig().runtime_config(profile=False)
    io_ = spu.Io(3, config)
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    bundles = Client(io_, 3).share({"i:x": x}, {"u:n": np.int32(5)})
    back = [commands.decode(_roundtrip(commands.encode("inputs", {"bundle": b})))[1]["bundle"] for b in bundles]
    assert all(b.public == frozenset({"u:n"}) for b in back)
    np.testing.assert_allclose(io_.reconstruct([b.values["i:x"] for b in back]), x, atol=1e-5)
    parts = next(sharing.pieces(x, "FM64", 18))
    got = [
        commands.decode(_roundtrip(commands.encode("weights", {"bundle": PartyShares(r, {"p:w": p})})))[1]["bundle"]
        for r, p in enumerate(parts)
    ]
    shares = [sharing.Assembler().add("w", g.values["p:w"]) for g in got]
    np.testing.assert_allclose(io_.reconstruct(shares), x, atol=1e-5)


def test_avals_and_profiles_round_trip():
    secret = {"input_ids": np.zeros((2, 8), np.int32), "gumbel": np.zeros((2, 5), np.float32)}
    args = {"model": "m", "approx": "puma-fast", "spec": ["forward", {}], "slot": "-", "bind": {}}
    spec, got = commands.decode(_roundtrip(commands.encode("run_task", {**args, "secret": secret, "public": {}})))
    assert spec.name == "run_task" and got["secret"]["input_ids"].shape == (2, 8)
    assert str(got["secret"]["gumbel"].dtype) == "float32"


@pytest.mark.parametrize(
    "frame, fragment",
    [
        (b"\x80\x04\x95" + b"\0" * 16, "not a puma message"),
        (messages.MAGIC + bytes([messages.VERSION]) + struct.pack("!I", messages.MAX_HEADER + 1), "exceeds"),
        (messages.MAGIC + bytes([messages.VERSION]) + struct.pack("!I", 4) + b"null", "must be an object"),
    ],
)
def test_malformed_frames_are_refused(frame, fragment):
    data = io.BytesIO(frame + b"\0" * 64)
    with pytest.raises(MessageError, match=fragment):
        messages.receive(lambda n: data.read(n))


@pytest.mark.parametrize(
    "op, args, fragment",
    [
        ("exec", {}, "unknown command"),
        ("drop", {"names": ["a"], "extra": 1}, "do not match"),
        ("drop", {"names": ["../../etc/passwd"]}, "not a valid name"),
        ("drop", {"names": "a"}, "must be a list"),
        ("hello", {"protocol": {}, "world_size": True, "rank": 0}, "must be an integer"),
        ("install", {"key": "k", "name": "n", "code": 3}, "out of range"),
        (
            "run_task",
            {
                "model": "m",
                "approx": "a",
                "spec": [],
                "slot": "s",
                "bind": {},
                "secret": {"x": [[2], "object"]},
                "public": {},
            },
            "dtype",
        ),
    ],
)
def test_arguments_are_checked_against_the_table(op, args, fragment):
    with pytest.raises(MessageError, match=fragment):
        commands.decode(Message(op, args))


def test_every_command_names_its_roles_and_no_client_command_reads_weights():
    for command in commands.COMMANDS.values():
        assert command.roles <= {commands.OPERATOR, commands.OWNER, commands.CLIENT}, command
    client = {c.name for c in commands.COMMANDS.values() if commands.CLIENT in c.roles}
    # client_manifest: a client-server job's signed manifest (tests/test_client_server.py)
    assert client == {"hello", "job", "client_manifest", "inputs", "run_task", "outputs", "free", "close"}
    owner = {c.name for c in commands.COMMANDS.values() if commands.OWNER in c.roles}
    assert owner == {"hello", "publish", "publish_weights", "publish_end", "unpublish", "status", "close"}
    json.dumps({c.name: sorted(c.roles) for c in commands.COMMANDS.values()})


def test_a_store_file_is_not_unpickled(tmp_path):
    config = ProtocolConfig().runtime_config(profile=False)
    io_ = spu.Io(3, config)
    share = io_.make_shares(np.ones(3, np.float32), libspu.Visibility.VIS_SECRET)[0]
    path = str(tmp_path / "x.share")
    commands.write_share(path, share)
    back = commands.read_share(path)
    assert back.meta == share.meta and list(back.share_chunks) == list(share.share_chunks)
    with open(path, "r+b") as f:
        f.seek(len(commands.SHARE_MAGIC))
        f.write(struct.pack("<Q", 1 << 60))
    with pytest.raises(Exception, match="damaged|truncated"):
        commands.read_share(path)
