"""Benchmarks: one registry that ``puma bench``, ``puma bench report`` and ``scripts/`` read.

Each benchmark is a module of this package with ``add_arguments(parser)`` (its options),
``main(args) -> dict`` (measure, write the JSON, return it) and ``markdown(result) -> str``;
:data:`REGISTRY` names it, says where its JSON goes by default and which sections of the
README's results it makes. Adding a benchmark is its module plus one entry here.

Every benchmark measures by default; ``--resume`` reuses the cells its JSON already holds (and
the command says how many it reused), ``--resume uncontended`` only those whose load record
(:mod:`puma.bench.load`) shows no other process contended them. Options several benchmarks share are in
:mod:`puma.options`.
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark: its ``puma bench`` name, module, one-line help, default JSON and the
    README sections it makes: (JSON file, heading, the command that makes that file)."""

    name: str
    module: str
    help: str
    out: str
    sections: tuple[tuple[str, str, str], ...] = ()

    def load(self):
        return importlib.import_module(f"puma.bench.{self.module}")


def _section(json_file: str, heading: str, command: str | None = None) -> tuple[str, str, str]:
    return json_file, heading, command or ""


REGISTRY: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "costs",
            "costs",
            "cost tables beside the PUMA paper (BERT, GPT-2, LLaMA shapes, SmolLM2), composed per layer",
            "bench-results/costs.json",
            (
                _section("costs.json", "Cost tables beside the PUMA paper", "puma bench costs"),
                _section(
                    "costs-nodes.json",
                    "LLaMA-7B on three party processes",
                    "puma bench costs --backend nodes -c configs/3pc.yaml --rows llama-7b --sizes 8+1 --sets "
                    "puma-fast --no-validate --out bench-results/costs-nodes.json",
                ),
            ),
        ),
        Benchmark(
            "peers",
            "peers",
            "PUMA's own code path and SPU's example setup beside puma's sets, in one run (sim)",
            "bench-results/peers.json",
            (
                _section(
                    "peers.json",
                    "Peers in one run: PUMA's own code path and SPU's example setup",
                    "puma bench peers --rows gpt2 bert-base llama-7b-layer",
                ),
                _section(
                    "peers-lean.json",
                    "Communication round 2: puma-lean beside PUMA's code path",
                    "puma bench peers --rows gpt2 bert-base llama-7b-layer --peers puma-code --sets puma-fast "
                    "puma-lean --out bench-results/peers-lean.json",
                ),
            ),
        ),
        Benchmark(
            "levers",
            "levers",
            "communication levers one at a time: bytes and send actions before/after (sim)",
            "bench-results/levers.json",
            (_section("levers.json", "Communication levers one at a time", "puma bench levers"),),
        ),
        Benchmark(
            "embeddings",
            "embeddings",
            "the three secure embeddings: measured, fitted to the cost model, compared per network (sim)",
            "bench-results/embeddings.json",
            (_section("embeddings.json", "The three secure embeddings under named networks", "puma bench embeddings"),),
        ),
        Benchmark(
            "protocols",
            "protocols_bench",
            "approximation sets: function errors/costs and model fidelity under MPC",
            "bench-results/protocols.json",
            (_section("protocols.json", "Approximation sets", "puma bench protocols"),),
        ),
        Benchmark(
            "generation",
            "generation",
            "bytes per prefill and decode step, with and without the secure KV cache",
            "bench-results/generation.json",
            (_section("generation.json", "Private generation with the secure KV cache", "puma bench generation"),),
        ),
        Benchmark(
            "latency",
            "latency",
            "latency per token: prefill and decode steps (rounds, bytes, LAN/WAN seconds), a decode step by model "
            "site, first token cold and warm (sim)",
            "bench-results/latency.json",
            (
                _section(
                    "latency.json",
                    "Latency per token: where a decode step's rounds and seconds go",
                    "puma bench latency",
                ),
            ),
        ),
        Benchmark(
            "accuracy",
            "accuracy",
            "accuracy suites: SST-2 (MiniLM), stories260K, WikiText-2, fraction bits, real LLMs (SmolLM2, Gemma 3)",
            "bench-results/accuracy.json",
            (
                _section("accuracy.json", "Accuracy suites", "puma bench accuracy"),
                _section(
                    "accuracy-lean.json",
                    "Accuracy suites for puma-lean",
                    "puma bench accuracy --suites stories wikitext sst2 --sets puma-lean --sst2-limit 64 "
                    "--out bench-results/accuracy-lean.json",
                ),
                _section(
                    "accuracy-smollm2.json",
                    "A real LLM under MPC: SmolLM2-135M",
                    "puma bench accuracy --suites real --sets puma-fast puma-lean puma "
                    "--out bench-results/accuracy-smollm2.json",
                ),
                _section(
                    "accuracy-gemma3.json",
                    "A real LLM under MPC: Gemma 3 270M (Gemma terms: benchmark use only)",
                    "puma bench accuracy --suites real --real-model gemma3 --sets puma-fast --real-lines 2 "
                    "--out bench-results/accuracy-gemma3.json",
                ),
            ),
        ),
        Benchmark(
            "serving",
            "serving",
            "a published model on nodes: first vs second query of a client, clients queued at once",
            "bench-results/serving.json",
            (_section("serving.json", "Serving a published model on nodes", "puma bench serving"),),
        ),
        Benchmark(
            "client-server",
            "client_server",
            "client-server mode (owner's party and client's, cheetah): stories260K and SmolLM2 fidelity, step costs "
            "on nodes and sim, GPT-2 beside three parties",
            "bench-results/client-server.json",
            (
                _section(
                    "client-server.json",
                    "Client-server mode measured",
                    "puma bench client-server",
                ),
            ),
        ),
        Benchmark(
            "faults",
            "faults",
            "nodes fault matrix (kill each rank at each phase of a job) and a job soak",
            "bench-results/faults.json",
            (_section("faults.json", "Deployment drills: faults and soak", "puma bench faults"),),
        ),
        Benchmark(
            "network",
            "netns",
            "the network time model against parties in rate-limited network namespaces (needs root)",
            "bench-results/network.json",
            (_section("network.json", "The network model against rate-limited namespaces", "sudo puma bench network"),),
        ),
    )
}
