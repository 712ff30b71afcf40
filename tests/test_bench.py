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


def test_resuming_uncontended_cells_measures_contended_ones_again(tmp_path):
    path = str(tmp_path / "r.json")
    store = CellStore(path, {"a": 1})
    store.measure("quiet", lambda: {"s": 1.0, "load": {"contended": False}})
    store.measure("busy", lambda: {"s": 9.0, "load": {"contended": True}})
    store.measure("old", lambda: {"s": 2.0})  # measured before cells recorded the load: kept
    store.put("row", {"paths": {"a": {"load": {"contended": False}}, "b": {"load": {"contended": True}}}})
    again = CellStore(path, {"a": 1}, resume="uncontended")
    assert [again.holds(k) for k in ("quiet", "busy", "old", "row", "absent")] == [True, False, True, False, False]
    measured = []

    def fresh(key):
        return lambda: measured.append(key) or {"s": 0.5, "load": {"contended": False}}

    assert [again.measure(k, fresh(k))["s"] for k in ("quiet", "busy", "old")] == [1.0, 0.5, 2.0]
    assert measured == ["busy"]
    assert json.load(open(path))["cells"]["busy"]["s"] == 0.5


def test_divergences_name_where_and_by_how_much_a_greedy_run_left_the_reference(stories_gguf):
    """A cell whose second prompt takes the reference's runner-up at token 3: that prompt only,
    at that token, rank 1, and the margin numpy reads from the reference's logits there."""
    from puma.api import SecureModel
    from puma.bench import fidelity

    reference = SecureModel.from_pretrained(stories_gguf)
    prompts = ["Once upon a time", "The little dog"]
    want = reference.generate(prompts, 6).tokens
    prefix = reference.model.tokenizer(prompts[1])["input_ids"] + want[1][:3]
    logits = np.asarray(reference.logits([prefix]).outputs, np.float64)[0, -1]
    first, second = np.argsort(logits)[::-1][:2]
    assert first == want[1][3]
    got = [want[0], want[1][:3] + [int(second), 1, 1]]
    cell = {"prompts": prompts, "tokens": got, "reference_tokens": want, "matching_prefix": [6, 3]}
    found = fidelity.divergences(reference, cell)
    margin = round(float(logits[first] - logits[second]), 4)
    assert found == [
        {
            "prompt": 1,
            "position": 3,
            "reference_token": int(first),
            "secure_token": int(second),
            "secure_rank": 1,
            "margin": margin,
        }
    ]
    result = {
        "config": {"real_model": "stories260K"},
        "results": {
            "real": {
                "puma-fast": {
                    "format": "FM64/18",
                    "greedy": {"match": [True, False], "matching_prefix": [6, 3]},
                    "divergences": found,
                    "perplexity": 1.0,
                    "perplexity_exact": 1.0,
                    "perplexity_change": 0.0,
                    "top1_agreement": 1.0,
                },
                "puma": {"format": "FM64/18", "greedy": {"match": [True, True], "matching_prefix": [6, 6]}},
            }
        },
    }
    assert (
        f"1 of 2; prompt 2 differs at token 3, where the plaintext top logit leads the MPC run's token by {margin:.4f}"
        in accuracy.markdown(result)
    )
    assert "| puma | FM64/18 | 2 of 2 | not measured | |  |" in accuracy.markdown(result)


def test_logistic_head_separates_separable_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5))
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0, 1.0]) > 0).astype(int)
    w, b = accuracy.train_logistic(x, y, l2=1e-4)
    assert np.mean(((x @ w + b) > 0) == y) > 0.97


def test_latency_targets_judge_each_smollm2_decode_row():
    """Issue 29's targets in the README: met or missed per set, from the latency cells alone."""
    step = {"max_party_send_actions": 2999.5, "wall_s": 6.5}
    cells = {
        "smollm2-135m/a": {"decode_mean": step},
        "smollm2-135m/a/first-token": {"warm": {"compile_s": 5.5}},
        "stories260K/a": {"decode_mean": step},
    }
    assert readme._latency_targets({"cells": cells}) == [
        "- SmolLM2-135M decode step with `a`: 3000 busiest-party sends (target at most 3000): met; "
        "6.50 s in sim (target at most 6 s): missed; warm first-token compile 5.50 s (target at most 5 s): missed"
    ]


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


def test_report_names_its_json_keeps_relative_paths_and_lists_what_it_left_out(tmp_path):
    folder = tmp_path / "out" / "results"
    folder.mkdir(parents=True)
    sweep = {
        f"{field}/{bits}": {
            "field": field,
            "fxp_bits": bits,
            "minilm_cosine_min": 0.999,
            "minilm_cosine_mean": 0.9995,
            "minilm_bytes_sent": 1e8,
            "stories_perplexity": 7.0,
            "stories_perplexity_exact": 6.9,
            "stories_top1": 0.9,
            "stories_bytes_sent": 1e8,
        }
        for field, bits in (("FM64", 16), ("FM64", 18), ("FM128", 32), ("FM128", 40))
    }
    (folder / "accuracy.json").write_text(json.dumps({"config": {}, "results": {"fxp": sweep}}))
    doc = tmp_path / "out" / "README.md"
    doc.write_text("# x\n")
    read, missing = readme.update(str(doc), str(folder))
    text = doc.read_text()
    assert read == ["results/accuracy.json"] and "JSON in `results/accuracy.json`" in text
    assert "![accuracy vs fraction bits](results/plots/accuracy_vs_bits.png)" in text  # relative to the README
    expected = sorted(json_file for json_file, *_ in readme.sections() if json_file != "accuracy.json")
    assert len(expected) >= 15  # every registered benchmark's sections but the one written
    assert sorted(missing) == expected
    assert "Not shown (no JSON yet): `costs.json` (`puma bench costs`)" in text
    series = plots.fxp_series(sweep)
    assert {f: [p["fxp_bits"] for p in pts] for f, pts in series.items()} == {"FM128": [32, 40], "FM64": [16, 18]}


def test_bench_on_nodes_needs_and_uses_a_topology(tmp_path, capsys):
    from puma import cli
    from tests.parties import local_parties, write_topology

    assert cli.main(["bench", "costs", "--backend", "nodes", "--rows", "gpt2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backend nodes needs the parties' topology: pass --config" in err[0]
    topo = write_topology(tmp_path / "t.yaml")
    with local_parties(topo, str(tmp_path)):
        cell = costs.run_once("gpt2-debug", (4, 1), "puma-fast", "nodes", {}, connect={"config": topo})
    assert cell["bytes_sent"] > 0 and all(p > 0 for p in cell["peak_rss"]["parties"])
    assert cell["heap_kept"]["parties"] == [True, True, True]


def test_network_time_model_on_hand_computed_cases():
    from puma import network

    lan, wan = network.NETWORKS["lan"], network.NETWORKS["wan"]
    # 10 s compute, 1000 rounds, 1 GB from the busiest party
    assert network.estimate(10.0, 1000, 1e9, lan) == pytest.approx(10.0 + 1000 * 1e-3 + 8e9 / 5e9)  # 12.6 s
    assert network.estimate(10.0, 1000, 1e9, wan) == pytest.approx(10.0 + 40.0 + 20.0)  # 70 s
    custom = network.parse("1G,10ms")
    assert (custom.bandwidth_bps, custom.rtt_s) == (1e9, 0.01)
    assert network.parse("400Mbps, 0.04s") == network.Network("custom", 400e6, 0.04)
    with pytest.raises(ValueError, match="not a network"):
        network.parse("fast")
    whole = {"bytes_sent": 9.0, "per_party": [{"bytes_sent": 2.0}, {"bytes_sent": 4.0}, {"bytes_sent": 3.0}]}
    assert network.busiest_bytes(whole) == 4.0
    composed = {"bytes_sent": 90.0, "layer": whole}
    assert network.busiest_bytes(composed) == pytest.approx(40.0)
    cell = {**whole, "compute_s": 1.0, "run_s": 5.0, "max_party_send_actions": 10}
    assert network.cell_times(cell, {"wan": wan})["wan"] == pytest.approx(1.0 + 0.4 + 4 * 8 / 400e6)
    # a client that uploads 400 MB of one-hot shares (and downloads 100 MB) waits 10 s more on the WAN
    one_hot = {**cell, "client_upload_bytes": 4e8, "client_download_bytes": 1e8}
    assert network.cell_times(one_hot, {"wan": wan})["wan"] == pytest.approx(1.0 + 0.4 + (4 + 5e8) * 8 / 400e6)


def test_load_monitor_tells_other_processes_from_ours():
    """CPU time of this process tree is ours; a detached spinning process is someone else's and
    makes the block contended (the oracle: the spinner's own ~3 s of CPU time)."""
    import subprocess
    import sys
    import time

    from puma.bench import load
    from puma.bench.load import LoadMonitor

    busy, cpu = load._busy_s(), time.process_time()
    with LoadMonitor() as own:
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            pass
    cpu = time.process_time() - cpu  # what we spun (less than 2.5 s on a busy machine)
    busy = load._busy_s() - busy  # the machine's: others' CPU raises it and others_cpu_s alike
    assert cpu > 0.2 and busy - own.others_cpu_s >= 0.8 * cpu, (cpu, busy, own.report())  # ours counted as ours
    spin = "import time\nend = time.time() + 4\nwhile time.time() < end: pass\n"
    subprocess.run(["sh", "-c", f"{sys.executable} -c '{spin}' >/dev/null 2>&1 &"], check=True)  # not our child
    with LoadMonitor() as busy:
        time.sleep(3.5)
    report = busy.report()
    assert report["contended"] and report["others_cpu_s"] >= 2.0, report


def test_real_targets_judge_each_real_llm_and_say_what_was_not_measured():
    """Issues 22 and 31 in the README: met only with every prompt identical and the perplexity within 1 %."""
    both = {
        "format": "FM64/18, shifts",
        "greedy": {"match": [True, True]},
        "perplexity_change": -0.004,
        "positions": 100,
    }
    greedy_only = {"format": "FM128/26", "greedy": {"match": [True, True]}}
    data = {
        "accuracy-smollm2.json": {"results": {"real": {"a": both, "b": {**both, "perplexity_change": 0.02}}}},
        "accuracy-gemma3.json": {"results": {"real": {"a": greedy_only}}},
    }
    assert readme._real_targets(data) == [
        "- SmolLM2-135M with `a` at FM64/18: greedy 32 tokens identical to plaintext on 2 of 2 prompts, WikiText-2 "
        "perplexity -0.40% (100 positions) (targets: all, within 1%): met",
        "- SmolLM2-135M with `b` at FM64/18: greedy 32 tokens identical to plaintext on 2 of 2 prompts, WikiText-2 "
        "perplexity +2.00% (100 positions) (targets: all, within 1%): missed",
        "- Gemma 3 270M with `a` at FM128/26: greedy 32 tokens identical to plaintext on 2 of 2 prompts, WikiText-2 "
        "perplexity not measured (targets: all, within 1%): missed",
    ]
