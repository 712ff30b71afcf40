"""semi2k's dealer: SPU takes its Beaver triples from party 0 (``TrustedFirstParty``), so party 0
could read the other party's data. Parties that are separate trust domains (``nodes``) refuse
it in one line naming cheetah and aby3, before any party process starts; ``sim`` and ``ray``
(one trust domain) run it for development and say so once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from puma import cli, runtime
from puma.errors import PumaError
from puma.runtime.config import Topology
from puma.runtime.nodes import OWNER, NodesMesh
from tests.parties import control_ports, descendants, wait_gone, write_topology

REFUSAL = "semi2k on nodes takes every Beaver triple from party 0 (SPU's TrustedFirstParty dealer)"
WARNING = "puma: semi2k takes every Beaver triple from party 0"


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_semi2k_on_nodes_is_refused_before_any_party_starts(tmp_path, capsys):
    topo = write_topology(tmp_path / "2pc.yaml", protocol="semi2k", world=2)
    before = set(descendants(os.getpid()))
    assert cli.main(["node", "up", "-c", topo]) != 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"puma: error: {topo}: {REFUSAL}"), lines
    assert "use protocol cheetah (no dealer) for two parties, or aby3 with three" in lines[0]
    assert set(descendants(os.getpid())) <= before, "node up started a party"
    assert not any(_listening(port) for port in control_ports(topo))

    proc = subprocess.Popen(
        [sys.executable, "-m", "puma.cli", "node", "start", "-c", topo, "--rank", "0", "--log-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=120)
        children = descendants(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and REFUSAL in lines[0], lines
    assert wait_gone(children) == [] and not any(_listening(port) for port in control_ports(topo))

    with pytest.raises(PumaError, match="use protocol cheetah") as refused:  # an owner or client connecting
        NodesMesh(Topology.from_yaml(topo), OWNER)
    assert "\n" not in str(refused.value)


def test_semi2k_on_sim_says_once_that_party_0_deals(capsys, stories_gguf):
    runtime._warn_first_party_dealer.cache_clear()
    args = ["generate", "-m", stories_gguf, "-p", "Once upon a time", "-n", "2", "--backend", "sim"]
    args += ["--protocol", "semi2k"]
    assert cli.main(args) == 0
    assert capsys.readouterr().err.count(WARNING) == 1
    with runtime.open_session("sim", protocol="semi2k"), runtime.open_session("sim", protocol="cheetah"):
        pass
    assert WARNING not in capsys.readouterr().err
