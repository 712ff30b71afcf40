"""The latency benchmark on llama-debug (random weights, sim): one generation's step figures are
the ones :class:`~puma.tasks.GenerationResult` reports, every site of a decode step costs a
positive whole number of send actions and bytes, the cold and warm first token run in new
processes, and the Markdown and plot render from the cells.

Oracles: ``GenerationResult.step_costs`` (the runtime's own per-step counts) and
:func:`puma.network.estimate` on them; the compile cache's files the cold process leaves.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from puma import network
from puma.api import SecureModel
from puma.bench import latency
from puma.bench.report import CellStore


def test_latency_cells_on_llama_debug(tmp_path):
    steps = 2
    with SecureModel.from_pretrained("llama-debug", approx="puma-fast", backend="sim") as m:
        text, ids = latency.prompt_for(m.model, 5)
        assert text is None and len(ids) == 5  # no tokenizer: seeded ids
        figures, result = latency.measure_generation(m, text, ids, steps)
        shapes = latency.decode_shapes(m.model.config, len(ids), steps)
        sites = latency.decode_sites(m.model.config, m.ops, shapes, shifts=m.model.shifts)
        found = latency.measure_sites(m.session, m.ops, sites, figures["decode_mean"])

    # the step figures are the runtime's own per-step counts
    assert [s["step"] for s in figures["steps"]] == ["prefill", "decode 1", "decode 2"]
    for got, want in zip(figures["steps"], result.step_costs):
        for key in ("max_party_send_actions", "send_actions", "bytes_sent", "max_party_bytes_sent", "wall_s"):
            assert got[key] == want[key]
        lan = network.estimate(
            got["compute_s"],
            want["max_party_send_actions"],
            want["max_party_bytes_sent"] + got["io_bytes"],
            network.NAMED["lan-10g"],
        )
        assert got["modelled_s"]["lan-10g"] == pytest.approx(lan, abs=1e-3)
        assert got["modelled_s"]["wan"] > got["modelled_s"]["lan-10g"] > 0
    decode = result.step_costs[1:]
    assert figures["decode_mean"]["bytes_sent"] == pytest.approx(np.mean([s["bytes_sent"] for s in decode]))
    assert figures["decode_mean"]["max_party_send_actions"] == pytest.approx(
        np.mean([s["max_party_send_actions"] for s in decode])
    )
    top = figures["top_ops_last_decode"]
    assert top["by_send_actions"][0]["send_actions"] > 0 and top["by_seconds"][0]["seconds"] > 0
    assert shapes["cache_slots"] == 16 and sum(shapes["valid"]) == 5 + steps  # the prompt, the decoded tokens, its own

    # every site costs a positive whole number of sends and bytes; the sum sits beside the step
    names = set(found["sites"])
    modelled = {"embedding", "norm", "projections", "rotary", "attention products", "softmax", "activation", "head"}
    assert modelled <= names
    for name, site in found["sites"].items():
        per_step = site["per_step"]
        for key in ("max_party_send_actions", "send_actions", "bytes_sent"):
            assert isinstance(per_step[key], int) and per_step[key] > 0, (name, key)
            assert per_step[key] == site["once"][key] * site["count"]
    assert found["sites"]["norm"]["count"] == 2 * m.model.config.num_hidden_layers + 1
    total = found["sum"]
    assert total["bytes_sent"] == sum(s["per_step"]["bytes_sent"] for s in found["sites"].values())
    assert found["measured_step"]["bytes_sent"] == figures["decode_mean"]["bytes_sent"]
    assert found["not_attributed"]["bytes_sent"] == pytest.approx(
        found["measured_step"]["bytes_sent"] - total["bytes_sent"], abs=1e-3
    )
    # the products and non-linearities the sites model are most of a step's bytes
    assert 0.5 < total["bytes_sent"] / found["measured_step"]["bytes_sent"] < 1.5

    # a new process, twice with one fresh cache: the warm one reads what the cold one compiled
    first = latency.first_token("llama-debug", "puma-fast", None, ids, timeout=300)
    assert first["cold"]["tokens"] == first["warm"]["tokens"] == result.tokens[0][:1]
    assert first["programs_cached"] >= 1 and first["warm"]["compile_s"] < first["cold"]["compile_s"]
    assert first["cold"]["process_s"] > 0 and "PUMA_CACHE" in first["command"]

    # the JSON the benchmark writes renders, and the sites plot is drawn from it
    store = CellStore(str(tmp_path / "latency.json"), {"backend": "sim", "prompt_tokens": 5, "decode_steps": steps})
    cell = {"approx": "puma-fast", "role": "default", "protocol": result.cost.protocol, "source": "llama-debug"}
    store.put("llama-debug/puma-fast", {**cell, **figures, "cache_slots": 16, "sites": found})
    store.put("llama-debug/puma-fast/first-token", first)
    data = json.loads((tmp_path / "latency.json").read_text())
    data["config"]["networks"] = {k: network.NAMED[k].describe() for k in latency.NETWORKS}
    text = latency.markdown(data)
    assert "| llama-debug | puma-fast (default) | aby3/FM64/18 | decode step (mean) |" in text
    assert "**not attributed (measured - sum)**" in text and "| llama-debug | puma-fast | head | 1 |" in text
    assert "cold process s" in text
    made = latency.plot(data, str(tmp_path / "plots"))
    assert [p.rsplit("/", 1)[1] for p in made] == ["latency_sites_llama-debug.png"]


def test_conversation_cell_on_a_tiny_chat_model(tmp_path, tiny_llama_chat):
    """Two turns of ``puma chat`` under MPC: the second message is one step (not one per token),
    the started-over prompt is the whole conversation so far, and the table renders."""
    talk = latency.measure_conversation(str(tiny_llama_chat[0]), "puma-chat", reply_tokens=3)
    first, second = talk["turns"]
    assert [t["message"] for t in talk["turns"]] == [latency.CHAT_EXAMPLE[0], latency.FOLLOW_UP]
    # the cache holds the first message, the first reply but its last token, then the second message
    # (which carries that token, or the template's closing after an end-of-sequence token)
    assert (
        talk["restart"]["prompt_tokens"]
        == first["message_tokens"] + first["reply_tokens"] - 1 + second["message_tokens"]
    )
    assert second["message_step"]["max_party_send_actions"] > 0 and second["first_token_s"] > 0
    decode = next(t["decode_mean"] for t in talk["turns"] if t["decode_mean"])
    assert second["message_step"]["max_party_send_actions"] < 2 * decode["max_party_send_actions"]
    store = CellStore(str(tmp_path / "latency.json"), {"backend": "sim"})
    store.put("tiny/puma-chat/conversation", talk)
    data = json.loads((tmp_path / "latency.json").read_text())
    data["config"].update(prompt_tokens=5, decode_steps=4, networks={k: "" for k in latency.NETWORKS})
    text = latency.markdown(data)
    assert "| tiny | puma-chat | 2, started over |" in text and "| tiny | puma-chat | 1 |" in text


def test_gemma3_sites_count_its_norms_and_read_a_blocked_table_as_the_model_does():
    """Gemma 3's decode step has four norms per block and per-head query/key norms; with its
    table in row blocks the embedding is one lookup per block and the head one product per block
    with the argmax over the joined logits. Oracles: the weights' names (norm count), and the
    same sites on the whole table: a block's lookup sends what the whole lookup sends (its
    output is the same [1, D]); the blocked head sends the same bytes (its outputs add up to V)
    in more send actions."""
    with SecureModel.from_pretrained("llama-debug") as llama:
        assert latency.block_norms(llama.model.param_avals()) == 2
    with SecureModel.from_pretrained("gemma3-debug", approx="puma-fast", backend="sim") as m:
        config = m.model.config
        per_layer = latency.block_norms(m.model.param_avals())
        assert per_layer == 4
        shapes = latency.decode_shapes(config, 5, 1)
        vocab = config.vocab_size
        blocks = [(0, 100), (100, vocab)]  # uneven, as a table whose rows do not divide evenly
        whole = {s.name: s for s in latency.decode_sites(config, m.ops, shapes, per_layer=per_layer)}
        blocked = {s.name: s for s in latency.decode_sites(config, m.ops, shapes, per_layer=per_layer, blocks=blocks)}
        assert whole["norm"].count == 4 * config.num_hidden_layers + 1
        assert whole["query/key norms"].count == config.num_hidden_layers
        assert blocked["embedding"].count == 2 and blocked["head"].count == 1
        cost = {
            (kind, name): latency.measure_site(m.session, m.ops, sites[name])
            for kind, sites in (("whole", whole), ("blocked", blocked))
            for name in ("embedding", "head")
        }
    one, two = cost["whole", "embedding"], cost["blocked", "embedding"]
    assert two["once"]["bytes_sent"] == one["once"]["bytes_sent"] > 0
    assert two["per_step"]["bytes_sent"] == 2 * one["per_step"]["bytes_sent"]
    one, two = cost["whole", "head"], cost["blocked", "head"]
    assert two["once"]["bytes_sent"] == one["once"]["bytes_sent"]
    # all parties' send actions: the busiest party's vary from run to run (81-84 for the same
    # head program here), the sum does not (241 whole, 249 in blocks)
    assert two["once"]["send_actions"] > one["once"]["send_actions"]
