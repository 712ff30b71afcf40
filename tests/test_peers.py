"""The peer harness (``puma bench peers``) on debug shapes. Oracles: transformers' PyTorch models in
float64 on the same seeded weights and ids (every path's revealed logits), the layer counts of the
debug configs (how many times PUMA's substitutes must run per trace), the cells themselves (ratios
are quotients of cells of the same run; per-party bytes add up to the total) and hand-made runs
for the layer difference. Tolerance: relative logit error at most 0.1 on every path (measured on
these shapes with transformers' init: at most 4.7e-2, from PUMA's GeLU, 2.0e-2 per element).
"""

from __future__ import annotations

import jax
import pytest
from transformers import modeling_flax_utils

from puma.bench import peers
from puma.errors import PumaError

PATHS = ("puma-code", "spu-example", "puma-fast")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers") / "peers.json"
    return peers.run(rows=("gpt2-debug",), peers=PATHS[:2], sets=PATHS[2:], out=str(out), resume=False)


def _check(cell: dict, path: str):
    assert cell["bytes_sent"] > 0, path
    assert len(cell["per_party"]) == 3, path
    assert sum(p["bytes_sent"] for p in cell["per_party"]) == cell["bytes_sent"], path
    assert cell["max_party_send_actions"] == max(p["send_actions"] for p in cell["per_party"]), path
    assert cell["client_upload_bytes"] > 0 and cell["client_download_bytes"] > 0, path
    assert cell["errors"]["relative"] <= 0.1, (path, cell["errors"])
    assert cell["errors"]["top1_agrees"] and cell["errors"]["token_agrees"], (path, cell["errors"])
    assert cell["network_s"]["wan"] > cell["network_s"]["lan"] >= cell["run_s"], path


def test_every_path_from_one_run_against_pytorch(table):
    cells = table["cells"]["gpt2-debug"]["paths"]
    assert set(cells) == set(PATHS)
    for path, cell in cells.items():
        _check(cell, path)
    # one substitute call per layer and trace: the PUMA path really ran PUMA's functions
    assert cells["puma-code"]["calls_per_trace"] == {"gelu": 2, "softmax": 2}
    assert "calls_per_trace" not in cells["puma-fast"] and cells["spu-example"]["calls_per_trace"] == {}
    for peer in PATHS[:2]:
        ratio = table["cells"]["gpt2-debug"]["ratios"][f"puma-fast/{peer}"]
        assert ratio["bytes"] == round(cells["puma-fast"]["bytes_sent"] / cells[peer]["bytes_sent"], 3)
        assert ratio["send_actions"] == round(
            cells["puma-fast"]["max_party_send_actions"] / cells[peer]["max_party_send_actions"], 3
        )
    markdown = peers.markdown(table)
    assert all(f"| {path} |" in markdown for path in PATHS) and "puma-fast/puma-code" in markdown


def test_a_layer_is_the_difference_of_its_cuts_per_party():
    def run(bytes_, sends):
        parties = [{"bytes_sent": b, "send_actions": s} for b, s in zip(bytes_, sends)]
        load = {"contended": False}
        per_op = {"pphlo.dot": {"bytes_sent": sum(bytes_), "send_actions": sum(sends)}}
        return {
            "bytes_sent": sum(bytes_),
            "send_actions": sum(sends),
            "run_s": 2.5,
            "per_party": parties,
            "per_op": per_op,
            "load": load,
            "client_upload_bytes": 7,
        }

    one, zero = run([50, 70, 60], [9, 12, 10]), {**run([10, 20, 10], [4, 3, 4]), "run_s": 1.0}
    layer = peers._combined(one, zero)
    assert layer["bytes_sent"] == 140 and [p["bytes_sent"] for p in layer["per_party"]] == [40, 50, 50]
    assert layer["max_party_send_actions"] == 9  # party 1: 12 - 3, the busiest difference
    assert layer["run_s"] == 1.5 and layer["client_upload_bytes"] == 7  # the client's I/O is one run's
    assert layer["per_op"]["pphlo.dot"] == {"bytes_sent": 140, "send_actions": 20}


@pytest.mark.parametrize("name, calls", [("bert-debug", {"gelu": 2, "softmax": 2}), ("llama-debug", None)])
def test_puma_code_path_substitutes_and_restores(tmp_path, name, calls):
    """BERT's GeLU and LLaMA's SiLU (one layer of the layer row's cut), with the softmax."""
    row = peers.ROWS[name]
    layers = 1 if row.layer else None
    reference = peers.save_reference(row, layers, str(tmp_path))
    saved, softmax = dict(modeling_flax_utils.ACT2FN), jax.nn.softmax
    cell = peers.cell("puma-code", row, str(tmp_path), layers)
    assert cell["calls_per_trace"] == (calls or {"silu": 1, "softmax": 1})
    assert modeling_flax_utils.ACT2FN == saved and jax.nn.softmax is softmax
    errors = peers.errors(cell, reference)
    assert errors["relative"] <= 0.1 and errors["top1_agrees"], errors


def test_a_substitution_that_never_runs_is_an_error(tmp_path, monkeypatch):
    row = peers.ROWS["gpt2-debug"]
    peers.save_reference(row, None, str(tmp_path))
    monkeypatch.setitem(peers.EXPECTED_CALLS, "gpt2", ("silu", "softmax"))  # GPT-2 has no SiLU
    with pytest.raises(PumaError, match="silu substitution never ran"):
        peers.cell("puma-code", row, str(tmp_path), None)


def test_unknown_rows_and_peers_are_one_line(tmp_path):
    with pytest.raises(PumaError, match="unknown row 'gpt5'; rows: gpt2"):
        peers.run(rows=("gpt5",), out=str(tmp_path / "p.json"))
    with pytest.raises(PumaError, match="unknown peer 'crypten'"):
        peers.run(rows=("gpt2-debug",), peers=("crypten",), out=str(tmp_path / "p.json"))


def test_round2_targets_say_met_or_by_how_much():
    def cell(b, sends):
        return {"bytes_sent": b, "max_party_send_actions": sends}

    cells = {
        "llama-7b-layer": {"paths": {"puma-code": cell(120e6, 600), "puma-lean": cell(90e6, 100)}},
        "gpt2": {"paths": {"puma-fast": cell(1.0e9, 4800), "puma-lean": cell(0.7e9, 3000)}},
    }
    by_target = {t["target"]: t for t in peers.targets(cells)}
    layer = by_target["llama-7b-layer puma-lean: bytes <= 0.5 x puma-code's"]
    assert layer["bound"] == 60e6 and not layer["met"] and layer["miss"] == 0.5
    assert by_target["gpt2 puma-lean: bytes <= 0.75 GB"]["met"]
    sends = by_target["gpt2 puma-lean: send actions of the busiest party <= 0.667 x puma-fast's"]
    assert sends["met"] and sends["bound"] == 3200.0
    assert not any(t["target"].startswith("bert-base") for t in by_target.values())
