"""Benchmark library: per-layer composition, resumable JSON, the logistic head, report rendering.

Oracles: full secure runs of 4-layer debug models (the composition must reproduce them), a
linearly separable problem for the logistic regression, and the JSON the renderers read.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from puma.bench import accuracy, costs, plots, readme
from puma.bench.report import CellStore


@pytest.mark.parametrize(
    "row",
    [
        costs.Row("bert-debug", "bert-debug", (16,), whole=(16,)),
        costs.Row("gpt2-debug", "gpt2-debug", ((8, 2),), whole=((8, 2),)),
    ],
)
def test_per_layer_composition_reproduces_whole_runs(tmp_path, row):
    store = CellStore(str(tmp_path / "c.json"), {"test": row.name})
    cell = costs.measure_row(store, row, row.sizes[0], "puma-fast", "sim", validate=True)
    assert cell["how"] == "measured whole" and cell["bytes_sent"] > 0
    assert abs(cell["composition_error"]) < 0.01
    assert abs(cell["validation_4_layers"]["error"]) < 0.01
    assert cell["secure_over_plaintext"] > 1
    text = costs.markdown({**store.data, "config": {"protocol": "aby3/FM64/18", "backend": "sim"}})
    assert f"| {row.name} |" in text and "measured whole" in text


def test_cell_store_resumes_and_restarts_on_new_config(tmp_path):
    path = str(tmp_path / "r.json")
    calls = []
    store = CellStore(path, {"a": 1})
    assert store.measure("x", lambda: calls.append(1) or 41) == 41
    again = CellStore(path, {"a": 1})
    assert again.measure("x", lambda: calls.append(1) or 0) == 41 and calls == [1]
    fresh = CellStore(path, {"a": 2})
    assert fresh.cells == {}
    data = json.load(open(path))
    assert data["environment"]["machine"]["cpus"] >= 1 and data["config"] == {"a": 1}


def test_logistic_head_separates_separable_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5))
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0, 1.0]) > 0).astype(int)
    w, b = accuracy.train_logistic(x, y, l2=1e-4)
    assert np.mean(((x @ w + b) > 0) == y) > 0.97


def test_readme_section_is_generated_from_json(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    cell = {
        "how": "composed",
        "bytes_sent": 4.9e9,
        "max_party_send_actions": 10,
        "run_s": 1.0,
        "secure_over_plaintext": 100.0,
        "per_op": {"pphlo.multiply": {"bytes_sent": 4e9}, "pphlo.less": {"bytes_sent": 0.9e9}},
    }
    (folder / "costs.json").write_text(
        json.dumps(
            {
                "config": {"protocol": "aby3/FM64/18", "backend": "sim"},
                "environment": {"machine": {"cpus": 2}},
                "cells": {"bert-base/128/puma-fast": cell, "bert-base/64/puma-fast": {**cell, "bytes_sent": 2e9}},
            }
        )
    )
    doc = tmp_path / "README.md"
    doc.write_text("# x\n")
    readme.update(str(doc), str(folder))
    text = doc.read_text()
    assert readme.START in text and readme.END in text
    assert "bert-base/128 with `puma-fast`: 4.900 GB against a target of 5.386 GB (half of PUMA's): met" in text
    assert (folder / "plots" / "bytes_by_op_bert_base.png").exists()
    readme.update(str(doc), str(folder))  # idempotent: the section is replaced, not appended
    assert doc.read_text().count(readme.START) == 1
    assert plots.cost_vs_length({"cells": {}}, "gpt2", str(tmp_path / "none.png")) is None


def test_whole_run_with_streamed_weights_records_steps_and_memory():
    cell = costs.run_once("llama-debug", (4, 2), "puma-fast", "sim", {}, {"weights": "streamed"})
    assert cell["weights"] == "streamed" and cell["weight_bytes"] > 0 and cell["weight_s"] > 0
    assert [s["step"] for s in cell["steps"]] == ["prefill", "decode 1"]
    assert sum(s["bytes_sent"] for s in cell["steps"]) == cell["bytes_sent"]
    assert cell["peak_rss"]["process"] > 0 and cell["compute_s"] <= cell["run_s"]
    resident = costs.run_once("llama-debug", (4, 2), "puma-fast", "sim", {}, {"weights": "resident"})
    assert resident["weights"] == "resident" and resident["weight_bytes"] == 0
    # staging changes no communication: the same ops run, split into stages
    assert abs(cell["bytes_sent"] / resident["bytes_sent"] - 1) < 0.01
