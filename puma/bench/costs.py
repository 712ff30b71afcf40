"""Cost tables beside the PUMA paper: communication, send actions and time of whole models.

Each row is a model shape (random weights: cost does not depend on their values) at one input
size, under ABY3 FM64 with 18 fraction bits, for each approximation set. A model is either
**measured whole** (one secure run of the full model) or **composed** from exact per-layer
measurements, when it does not fit this machine (24 GiB, 2 cores):

    cost(L layers) = base + L * layer,  layer = C(2) - C(1),  base = C(1) - layer,

with C(n) a full secure run of the model cut to n layers (``base`` is the embedding, the head
and the I/O around them). For LLaMA-7B, whose embedding and head alone outgrow memory next to a
layer, ``layer`` comes from 1- and 0-layer runs with the vocabulary cut to 512 and ``base`` from
a 0-layer run with the full 32000-word vocabulary and a tied table (same shapes and cost as the
untied head, half the memory). ``validate`` checks the rule against whole runs (2-, 4- and
12-layer models) and reports the relative error.

Totals count the bytes *sent* by all three parties during execution (see
:mod:`puma.runtime.cost`); send actions are the parties' send calls (the max over parties
approximates the number of communication rounds).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
from tqdm import tqdm

from puma import calibration, network, protocols
from puma.api import SecureModel
from puma.bench.load import LoadMonitor, wait_quiet
from puma.bench.report import CellStore, profiled
from puma.errors import PumaError
from puma.models import presets

log = logging.getLogger(__name__)

#: PUMA paper, arXiv 2307.12533 (Tables 3, 4, 6): (total communication GB, seconds or None).
PAPER = {
    ("bert-base", 128): (10.773, 33.9),
    ("gpt2", 32): (3.774, 15.5),
    ("llama-7b", (8, 1)): (1.794, 200.5),
    ("llama-7b", (8, 2)): (3.857, None),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """A model shape (a preset, or a real checkpoint measured whole only) and the input sizes
    it is measured at."""

    name: str
    preset: str  # a preset name, or a checkpoint (path or installed model such as "smollm2")
    sizes: tuple  # sequence lengths (encoders) or (prompt, new tokens) pairs (causal)
    whole: tuple = ()  # sizes measured as one full run (the rest are composed)
    overrides: tuple = ()
    fixed: tuple = ()  # (field, fxp_bits) asked for; empty: the format the calibration preflight picks

    @property
    def checkpoint(self) -> bool:
        return self.preset not in presets()


ROWS = {
    "bert-base": Row("bert-base", "bert-base", (64, 128, 256), whole=(128,)),
    "roberta-base": Row("roberta-base", "roberta-base", (128,)),
    "bert-large": Row("bert-large", "bert-large", (64, 128, 256), whole=(128,)),
    "gpt2": Row("gpt2", "gpt2", ((16, 1), (32, 1), (64, 1)), whole=((32, 1),)),
    "gpt2-medium": Row("gpt2-medium", "gpt2-medium", ((16, 1), (32, 1), (64, 1))),
    "gpt2-large": Row("gpt2-large", "gpt2-large", ((16, 1), (32, 1), (64, 1)), whole=((32, 1),)),
    "llama-7b": Row("llama-7b", "llama-7b", ((4, 1), (8, 1), (8, 2)), whole=((4, 1), (8, 1), (8, 2))),
    # a real LLM with massive activations: FM64/18 with calibrated norm pre-scales, and FM128/26
    "smollm2-135m": Row("smollm2-135m", "smollm2", ((32, 4),), whole=((32, 4),)),
    "smollm2-135m-fm128": Row("smollm2-135m-fm128", "smollm2", ((32, 4),), whole=((32, 4),), fixed=("FM128", 26)),
}


def full_layers(preset: str) -> int:
    return presets()[preset][1].num_layers


def _infer(m: SecureModel, size):
    """The measured inference: generation for (prompt, new) sizes, a BERT forward otherwise.
    Returns (cost, per-step costs)."""
    rng = np.random.default_rng(0)
    vocab = m.model.config.vocab_size
    if isinstance(size, tuple):
        prompt, new = size
        if m.model.tokenizer is not None:  # a real model: real text (random ids may end it at once)
            ids = m.model.tokenizer(" ".join(calibration.TEXTS))["input_ids"][:prompt]
        else:
            ids = rng.integers(10, min(vocab, 500), prompt).tolist()
        result = m.generate_ids([ids], new, prompt_bucket=1, slot_bucket=1)
        if sum(len(t) for t in result.tokens) < new:
            raise RuntimeError("generation stopped at end-of-text")
        return result.cost, result.step_costs
    ids = rng.integers(10, min(vocab, 1000), (1, size)).astype(np.int32)
    return m.encode_ids(ids, "pooled").cost, []


def _compute_s(cost) -> float:
    """Seconds of the runs themselves: wall time less the owner's weight streaming."""
    return cost.wall_s - cost.weight_s


def plaintext_time(preset: str, size, overrides: dict, memory: dict | None = None) -> float:
    """Seconds of the same inference in plaintext on this machine (``jax.jit``, second call;
    weight loading excluded), with the same weights mode."""
    plain = SecureModel.from_pretrained(preset, approx="exact", overrides=overrides, **(memory or {}))
    _infer(plain, size)
    return _compute_s(_infer(plain, size)[0])


def run_once(
    preset: str,
    size,
    approx,
    backend: str,
    overrides: dict,
    memory: dict | None = None,
    connect: dict | None = None,
    quiet: bool = False,
    fixed: tuple = (),
) -> dict:
    """One secure run of ``preset`` (with ``overrides``) at ``size`` under the set ``approx`` (a
    name or an ``Ops``; the parts of a composed cell are middle layers, ``Ops.as_middle_layer``):
    cost, wall time and peak
    memory, and the time of the same computation in plaintext (jit-compiled, second call) on
    this machine. ``memory`` holds ``weights``/``memory_budget`` for both (default: auto);
    ``connect`` says where the parties are (``config``: a topology file, ``ray_address``).
    ``quiet``: wait (up to 10 minutes) for the machine to be quiet first, or refuse. The cell
    records the machine's load while it ran (:mod:`puma.bench.load`). ``fixed`` (field, fraction
    bits) asks for a format; by default the calibration preflight picks it (the cell says which)."""
    from puma.runtime import memory as mem

    memory = memory or {}
    fmt = dict(zip(("field", "fxp_bits"), fixed))
    if quiet and not wait_quiet(600):
        raise PumaError("the machine stayed busy for 10 minutes: other processes take CPU time (see top)")
    for attempt in range(3):
        mem.reset_peak()
        start = time.perf_counter()
        with SecureModel.from_pretrained(
            preset, approx=approx, backend=backend, overrides=overrides, **memory, **(connect or {}), **fmt
        ) as m:
            plan = m.weight_plan
            fixed_plan = m.fixed_plan
            heaps = m.session.mesh.party_heaps_kept()
            with LoadMonitor(getattr(m.session.mesh, "pids", ())) as machine:
                cost, steps = _infer(m, size)
        total = time.perf_counter() - start
        if not cost.unprofiled_runs or attempt == 2:
            break
        log.warning("%s %s: a run was not profiled per party; measuring again", preset, size)
    profiled(cost)
    peak = mem.peak_rss()
    plaintext_s = plaintext_time(preset, size, overrides, memory)
    report = cost.to_dict()
    per_party_actions = [p["send_actions"] for p in report["per_party"]]
    return {
        "bytes_sent": report["total_bytes_sent"],
        "send_actions": report["total_send_actions"],
        "max_party_send_actions": max(per_party_actions),
        "run_s": round(report["wall_s"], 2),
        "compute_s": round(_compute_s(cost), 2),
        "total_s": round(total, 2),
        "plaintext_s": round(plaintext_s, 4),
        "plaintext_synced": True,  # stage outputs waited for (see PlaintextSession._run)
        "weights": plan.mode,
        "format": fixed_plan.describe() if fixed_plan else None,
        "heap_kept": {"process": mem.heap_kept(), "parties": heaps},
        "load": machine.report(),
        "weight_bytes": report["weight_bytes"],
        "weight_s": report["weight_s"],
        "peak_rss": {**report["peak_rss"], "process": peak},
        "steps": steps,
        "per_party": report["per_party"],
        "per_op": {
            k: {"bytes_sent": v["bytes_sent"], "seconds": round(v["seconds"], 3)} for k, v in report["per_op"].items()
        },
        "io_bytes": report["io_bytes"],
    }


#: Fields that add up over layers.
ADDITIVE = ("bytes_sent", "send_actions", "max_party_send_actions", "run_s", "plaintext_s", "io_bytes")


def _combine(base: dict, layer: dict, layers: int) -> dict:
    """base + layers * layer for the additive fields."""
    out = {}
    for key in ADDITIVE:
        out[key] = base[key] + layers * layer[key]
    ops = set(base["per_op"]) | set(layer["per_op"])
    out["per_op"] = {
        op: {
            "bytes_sent": base["per_op"].get(op, {}).get("bytes_sent", 0)
            + layers * layer["per_op"].get(op, {}).get("bytes_sent", 0)
        }
        for op in ops
    }
    return out


def _diff(a: dict, b: dict) -> dict:
    """a - b for the additive fields."""
    out = {k: a[k] - b[k] for k in ADDITIVE}
    ops = set(a["per_op"]) | set(b["per_op"])
    out["per_op"] = {
        op: {"bytes_sent": a["per_op"].get(op, {}).get("bytes_sent", 0) - b["per_op"].get(op, {}).get("bytes_sent", 0)}
        for op in ops
    }
    return out


#: Fields that are measured durations: noisy, so fitted over every layer count measured.
TIMES = ("run_s", "plaintext_s")


def _fit_times(base: dict, layer: dict, runs: dict[int, dict]) -> None:
    """Least-squares line through (layers, seconds) of the runs, into ``base`` and ``layer``.

    Bytes and messages are exactly additive (two runs fix them); durations carry machine noise,
    so the per-layer time is fitted over all measured layer counts instead.
    """
    counts = np.array(sorted(runs), dtype=float)
    for key in TIMES:
        times = np.array([runs[int(n)][key] for n in counts])
        slope, intercept = np.polyfit(counts, times, 1)
        layer[key], base[key] = float(slope), float(intercept)


def measure_row(
    store: CellStore,
    row: Row,
    size,
    approx: str,
    backend: str,
    validate: bool,
    memory: dict | None = None,
    connect: dict | None = None,
    quiet: bool = False,
) -> dict:
    """The cell for ``row`` at ``size``: measured whole or composed (with its parts); a
    checkpoint's row is measured whole only."""
    tag = f"{row.name}/{_size_tag(size)}/{approx}"
    if row.checkpoint:
        whole = store.measure(
            f"parts/{row.name}/{_size_tag(size)}/{approx}/whole",
            lambda: run_once(row.preset, size, approx, backend, {}, memory, connect, quiet, row.fixed),
        )
        result = {"how": "measured whole", **whole}
        result["secure_over_plaintext"] = result["compute_s"] / max(result["plaintext_s"], 1e-9)
        result["network_s"] = {k: round(v, 2) for k, v in network.cell_times(result, network.NETWORKS).items()}
        store.put(tag, result)
        return result
    layers_key = presets()[row.preset][1].FIELDS["num_layers"]  # the HF field a cut-down run overrides
    layers = full_layers(row.preset)

    used = []

    def part(n: int, extra: tuple = ()) -> dict:
        overrides = dict(row.overrides) | {layers_key: n} | dict(extra)
        key = f"parts/{row.preset}/{_size_tag(size)}/{approx}/" + ",".join(
            f"{k}={v}" for k, v in sorted(overrides.items())
        )
        measured = store.measure(
            key,
            lambda: run_once(
                row.preset,
                size,
                protocols.get(approx).as_middle_layer(),
                backend,
                overrides,
                connect=connect,
                quiet=quiet,
            ),
        )
        used.append(measured)
        return measured

    if size in row.whole:
        whole = store.measure(
            f"parts/{row.preset}/{_size_tag(size)}/{approx}/whole",
            lambda: run_once(row.preset, size, approx, backend, dict(row.overrides), memory, connect, quiet),
        )
        result = {"how": "measured whole", **{k: whole[k] for k in whole}}
    else:
        result = {"how": "composed"}
    if row.preset.startswith("llama"):
        small = (("vocab_size", 512),)
        layer = _diff(part(1, small), part(0, small))
        base = part(0, (("tie_word_embeddings", True),))
    else:
        one, two = part(1), part(2)
        layer = _diff(two, one)
        base = _diff(one, layer)
        if validate:
            _fit_times(base, layer, {1: one, 2: two, 4: part(4)})
    composed = _combine(base, layer, layers)
    result["composed"] = composed
    result["layer"] = layer
    result["base"] = base
    result["layers"] = layers
    if result["how"] == "composed":
        result.update({k: composed[k] for k in (*ADDITIVE, "per_op")})
        loads = [p.get("load") for p in used]
        if all(loads):  # a composed time is contended when any run it comes from was
            result["load"] = {
                "others_cpu_s": round(sum(load["others_cpu_s"] for load in loads), 2),
                "wall_s": round(sum(load["wall_s"] for load in loads), 2),
                "contended": any(load["contended"] for load in loads),
            }
    else:
        result["composition_error"] = composed["bytes_sent"] / result["bytes_sent"] - 1.0
    if validate and not row.preset.startswith("llama"):
        four = part(4)  # measured above
        result["validation_4_layers"] = {
            "measured": four["bytes_sent"],
            "composed": _combine(base, layer, 4)["bytes_sent"],
            "error": _combine(base, layer, 4)["bytes_sent"] / four["bytes_sent"] - 1.0,
        }
    seconds = result.get("compute_s", result["run_s"])
    result["secure_over_plaintext"] = seconds / max(result["plaintext_s"], 1e-9)
    result["network_s"] = {k: round(v, 2) for k, v in network.cell_times(result, network.NETWORKS).items()}
    paper = PAPER.get((row.name, size[0] if isinstance(size, tuple) and row.name != "llama-7b" else size))
    if paper:
        result["paper"] = {"gigabytes": paper[0], "seconds": paper[1]}
    store.put(tag, result)
    return result


def _size_tag(size) -> str:
    return f"{size[0]}+{size[1]}" if isinstance(size, tuple) else str(size)


def run(
    rows=("bert-base", "gpt2"),
    sets=("puma-fast", "puma"),
    backend: str = "sim",
    sizes=None,
    out: str = "bench-results/costs.json",
    validate: bool = True,
    resume: bool = True,
    weights: str = "auto",
    memory_budget: int | None = None,
    connect: dict | None = None,
    quiet: bool = False,
) -> dict:
    """Fill the cost table for ``rows`` x sizes x ``sets`` (resumable). Whole runs choose
    resident or streamed weights by ``weights``/``memory_budget`` (see :mod:`puma.runtime.budget`);
    ``connect`` (``config``, ``ray_address``) says where the ``nodes``/``ray`` parties are."""
    config = {"backend": backend, "protocol": "aby3/FM64/18"}  # rows, sizes and sets only choose cells
    store = CellStore(out, config, resume=resume)
    plan = []
    for name in rows:
        row = ROWS[name]
        for size in row.sizes:
            if sizes is None or _size_tag(size) in sizes or str(size) in sizes:
                plan += [(row, size, s) for s in sets]
    for row, size, approx in tqdm(plan, desc="cost table", unit="cell"):
        key = f"{row.name}/{_size_tag(size)}/{approx}"
        unvalidated = validate and not row.checkpoint and "validation_4_layers" not in store.cells.get(key, {})
        if not store.holds(key) or unvalidated:
            measure_row(
                store,
                row,
                size,
                approx,
                backend,
                validate,
                {"weights": weights, "memory_budget": memory_budget},
                connect,
                quiet,
            )
    return store.data


def add_arguments(p) -> None:
    from puma import options

    p.add_argument(
        "--rows", nargs="+", default=["bert-base", "gpt2"], choices=list(ROWS), help="rows (default: %(default)s)"
    )
    options.add_sets_arg(p, ["puma-fast", "puma"])
    p.add_argument("--sizes", nargs="+", help="only these sizes (128, 32+1, ...) (default: every size of each row)")
    options.add_bench_backend_args(p)
    p.add_argument(
        "--network", type=options.network, help="also model the time under BANDWIDTH,RTT, e.g. 1G,10ms (default: none)"
    )
    options.add_quiet_arg(p)
    p.add_argument(
        "--no-validate", action="store_true", help="skip the 4-layer check of the composition (default: check it)"
    )
    options.add_memory_args(p)


def main(args) -> dict:
    from puma import options

    result = run(
        args.rows,
        args.sets,
        args.backend,
        args.sizes,
        args.out,
        not args.no_validate,
        resume=args.resume,
        weights=args.weights,
        memory_budget=args.memory_budget,
        connect=options.connect(args),
        quiet=args.require_quiet,
    )
    return {**result, "extra_network": args.network}  # a column of the printed table, not of the JSON


def markdown(result: dict, extra_network: str | None = None) -> str:
    extra_network = extra_network or result.get("extra_network")
    nets = {"lan": network.NETWORKS["lan"], "wan": network.NETWORKS["wan"]}
    if extra_network:
        nets["custom"] = network.parse(extra_network)
    heads = " | ".join(f"{n.name} s" if k != "custom" else f"{n.describe()} s" for k, n in nets.items())
    lines = [
        f"Secure inference cost, {result['config']['protocol']} ({result['config']['backend']} backend, "
        f"{result['environment']['machine']['cpus']} CPUs): total bytes sent by all parties. "
        + "Modelled time under "
        + ", ".join(n.describe() for n in nets.values())
        + ": this machine's compute seconds + busiest party's send actions x RTT + its bytes / bandwidth "
        "(puma/network.py).",
        "",
        "| model | input | set | GB | send actions (max party) | seconds | secure / plaintext time | "
        f"PUMA paper GB / s | how | weights (streaming s) | peak RSS GiB | {heads} |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(nets),
    ]
    for key, cell in result["cells"].items():
        if key.startswith("parts/"):
            continue
        name, size, approx = key.split("/")
        paper = cell.get("paper")
        paper_text = "-"
        if paper:
            seconds = "-" if paper["seconds"] is None else f"{paper['seconds']:.1f}"
            paper_text = f"{paper['gigabytes']:.3f} / {seconds}"
        how = cell["how"]
        if cell.get("format") and "no norm pre-scaling" not in cell["format"]:
            how += f" at {cell['format']}"
        if "composition_error" in cell:
            how += f" (composed: {cell['composition_error']:+.2%})"
        weights = cell.get("weights", "resident" if cell["how"] == "measured whole" else "-")
        if cell.get("weight_bytes"):
            kept = cell.get("heap_kept", {}).get("process")
            weights += f" ({cell['weight_s']:.0f}{'' if kept else '; freed memory not kept'})"
        peaks = cell.get("peak_rss", {})
        peak, parties = peaks.get("process"), [p for p in peaks.get("parties", []) if p]
        peak_text = f"{peak / 2**30:.2f}" if peak else "-"
        if parties:  # party processes of their own: the driver's peak and the largest party's
            peak_text += f" + {len(parties)} x {max(parties) / 2**30:.2f}"
        modelled = network.cell_times(cell, nets)
        load = cell.get("load")
        seconds = f"{cell['run_s']:.1f}" + (" †" if load is None else " (contended)" if load["contended"] else "")
        # streamed plaintext stages measured before their outputs were waited for: compute was
        # timed as weight loading, so the ratio would be inflated
        unsynced = cell.get("weights") == "streamed" and not cell.get("plaintext_synced")
        ratio = "-" if unsynced else f"{cell['secure_over_plaintext']:.0f}x"
        lines.append(
            f"| {name} | {size} | {approx} | {cell['bytes_sent'] / 1e9:.3f} | "
            f"{cell['max_party_send_actions']} | {seconds} | {ratio} | "
            f"{paper_text} | {how} | {weights} | {peak_text} | " + " | ".join(f"{modelled[k]:.1f}" for k in nets) + " |"
        )
    lines += [
        "",
        "Seconds marked † were measured before cells recorded the machine's load: they may be contended "
        "(re-measure with `--require-quiet`); unmarked ones ran on a quiet machine.",
    ]
    stepped = {k: c for k, c in result["cells"].items() if not k.startswith("parts/") and len(c.get("steps", [])) > 1}
    if stepped:
        lines += [
            "",
            "Per step of the whole runs (the decode steps use the secret KV cache; streamed weights are "
            "shared again for every step):",
            "",
            "| model | input | set | step | GB | send actions | seconds | of which streaming |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, cell in stepped.items():
            name, size, approx = key.split("/")
            for step in cell["steps"]:
                lines.append(
                    f"| {name} | {size} | {approx} | {step['step']} | {step['bytes_sent'] / 1e9:.3f} | "
                    f"{step['send_actions']} | {step['wall_s']:.1f} | {step.get('weight_s', 0):.1f} |"
                )
    return "\n".join(lines)
