"""Peers in one run: PUMA's own code path and SPU's example setup beside puma's sets.

Every path runs the same model (one seeded PyTorch checkpoint, saved once per row and loaded by
each path), on the same token ids, under the same SPU (ABY3, FM64, 18 fraction bits, ``sim``),
each in a process of its own (:func:`puma.runtime.children.run_isolated`), so no path inherits
another's memory, patches or compiled programs:

- ``puma-code``, **PUMA's published path**: transformers' Flax classes (``FlaxGPT2LMHeadModel``,
  ``FlaxBertForSequenceClassification``, ``FlaxLlamaForCausalLM``) run by SPU with PUMA's
  substitutions made the way PUMA's benchmark scripts make them: ``jax.nn.softmax`` replaced
  (flax's ``dot_product_attention_weights`` looks it up at call time) by PUMA's script softmax
  (:func:`puma_code_softmax`); GeLU and SiLU replaced in transformers' activation table
  ``ACT2FN`` (the Flax modules read it when they are set up, during tracing; patching ``jax.nn``
  after import would change nothing) by PUMA's piecewise polynomials
  (:func:`puma.protocols.puma.gelu`, :func:`puma.protocols.puma.silu`). PUMA's runtime settings:
  Taylor exp with 5 iterations and the ``enable_optimize_denominator_with_broadcast`` compiler
  option. Its input path: secret token ids looked up by SPU's secret-index gather (``nn.Embed``),
  and HF's own attention masks. Each substituted function counts its calls while the program is
  traced; a substitution that never ran is an error, and the counts are in the JSON.
- ``spu-example``, **SPU's example setup**: the same Flax models with SPU's defaults (SPU's exp,
  softmax, GeLU and division; no substitutions), as SPU's GPT-2 example runs them.
- puma's approximation sets (``puma``, ``puma-fast``, ...): puma's own models and input path.

Every path reveals the same outputs: for a causal LM the last position's logits and the greedy
token (argmax under MPC); for a classifier its class logits. Errors are against transformers'
PyTorch model in float64 on the same weights and ids (max |logit error|, that over the
reference's largest |logit|, and whether the top-1 class or token agrees). Weights are
transformers' own initialisation (seeded), since no trained checkpoint of these shapes is
offline: cost does not depend on the values, the errors do (trained weights give larger
activations).

A ``layer`` row reports one decoder layer: each path runs the model cut to 1 and to 0 layers
(with a small vocabulary), and the layer's cost is the difference (as in
:mod:`puma.bench.costs`); its errors are those of the 1-layer run.

Cost columns per path: total bytes sent by all parties, client upload/download bytes (its input
shares and the output shares it receives), send actions of the busiest party, wall seconds
(compilation excluded) with the machine's load while the cell ran, and the time modelled under
LAN and WAN (:mod:`puma.network`). Ratios of each puma set to each peer come from the
cells of this one invocation.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import tempfile

import numpy as np
from tqdm import tqdm

from puma import network, protocols
from puma.bench.load import LoadMonitor, wait_quiet
from puma.bench.report import CellStore, profiled
from puma.errors import PumaError
from puma.models import presets
from puma.program import Program
from puma.runtime.children import run_isolated

log = logging.getLogger(__name__)

#: PUMA's benchmark softmax clips exponents below this to 0.
PUMA_CODE_EXP_CLIP = -14.0
#: PUMA's runtime settings (its 3pc.json and compiler options): Taylor exp, 5 iterations.
PUMA_CODE_SPU = protocols.SpuSettings(
    runtime=(("fxp_exp_iters", 5), ("fxp_exp_mode", "EXP_TAYLOR")),
    compiler=(("enable_optimize_denominator_with_broadcast", True),),
)
#: SPU's defaults (the ``spu`` set turns puma's one default compiler option off again).
SPU_EXAMPLE_SPU = protocols.get("spu").spu

#: Families -> (transformers Flax class, PyTorch class) per task.
HF_CLASSES = {
    ("gpt2", "causal"): ("FlaxGPT2LMHeadModel", "GPT2LMHeadModel"),
    ("llama", "causal"): ("FlaxLlamaForCausalLM", "LlamaForCausalLM"),
    ("bert", "classify"): ("FlaxBertForSequenceClassification", "BertForSequenceClassification"),
}
#: The non-linearities each family's PUMA path must have substituted.
EXPECTED_CALLS = {"gpt2": ("gelu", "softmax"), "bert": ("gelu", "softmax"), "llama": ("silu", "softmax")}

CLASSIFIER = (("architectures", ("BertForSequenceClassification",)), ("id2label", ("negative", "positive")))


@dataclasses.dataclass(frozen=True)
class PeerRow:
    """A model shape, its input length and what is revealed (``causal`` or ``classify``)."""

    name: str
    preset: str
    tokens: int
    task: str
    overrides: tuple = ()
    layer: bool = False  # one decoder layer: runs with 1 and 0 layers, the difference


ROWS = {
    "gpt2": PeerRow("gpt2", "gpt2", 32, "causal"),
    "bert-base": PeerRow("bert-base", "bert-base", 128, "classify", CLASSIFIER),
    "llama-7b-layer": PeerRow("llama-7b-layer", "llama-7b", 8, "causal", (("vocab_size", 512),), layer=True),
    "gpt2-debug": PeerRow("gpt2-debug", "gpt2-debug", 16, "causal"),
    "bert-debug": PeerRow("bert-debug", "bert-debug", 16, "classify", CLASSIFIER),
    "llama-debug": PeerRow("llama-debug", "llama-debug", 8, "causal", layer=True),
}

#: The peers: name -> (description, SPU settings, substitutions on).
PEERS = {
    "puma-code": ("PUMA's published path (transformers Flax + PUMA's substitutions and settings)", PUMA_CODE_SPU, True),
    "spu-example": ("SPU's example setup (transformers Flax, SPU's defaults)", SPU_EXAMPLE_SPU, False),
}


def puma_code_softmax(x, axis=-1, where=None, initial=None):
    """PUMA's benchmark-script softmax, in ``jax.nn.softmax``'s signature.

    z = x - max(x); e = exp(z) * [z > -14]; softmax = e / sum(e). ``exp`` is SPU's (Taylor,
    5 iterations in PUMA's settings) and the division by the broadcast row sum becomes one
    reciprocal per row under the ``enable_optimize_denominator_with_broadcast`` option. Source:
    PUMA (arXiv 2307.12533, §4.2) as its published scripts implement it.
    """
    import jax.numpy as jnp

    z = x - jnp.max(x, axis, where=where, initial=initial, keepdims=True)
    e = jnp.exp(z) * (z > PUMA_CODE_EXP_CLIP)
    return e / jnp.sum(e, axis, where=where, keepdims=True)


@contextlib.contextmanager
def puma_substitutions(calls: collections.Counter):
    """PUMA's substitutions where transformers' Flax models look the functions up; every
    substitute counts its calls in ``calls``. Restored on exit."""
    import jax
    from transformers import modeling_flax_utils

    from puma.protocols import puma

    def counted(name, fn):
        def substitute(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return substitute

    table = modeling_flax_utils.ACT2FN
    saved_table, saved_softmax = dict(table), jax.nn.softmax
    gelu, silu = counted("gelu", puma.gelu), counted("silu", puma.silu)
    table.update({"gelu": gelu, "gelu_new": gelu, "gelu_pytorch_tanh": gelu, "silu": silu, "swish": silu})
    jax.nn.softmax = counted("softmax", puma_code_softmax)
    try:
        yield
    finally:
        table.clear()
        table.update(saved_table)
        jax.nn.softmax = saved_softmax


# -- the reference and the inputs ---------------------------------------------------------------


def _config(row: PeerRow, layers: int | None):
    """puma's config for the row (with the layer count of a ``layer`` row's cut)."""
    family, config = presets()[row.preset]
    fields = dict(row.overrides)
    if layers is not None:
        fields[config.FIELDS["num_layers"]] = layers
    return family, dataclasses.replace(config, **fields)


def inputs(row: PeerRow, vocab: int) -> dict:
    """The row's token ids [1, tokens] (seeded), token types and attention mask."""
    ids = np.random.default_rng(0).integers(10, min(vocab, 1000), (1, row.tokens)).astype(np.int32)
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}


def save_reference(row: PeerRow, layers: int | None, folder: str) -> dict:
    """Save the row's PyTorch checkpoint (transformers' init, seed 0) in ``folder``; return its
    float64 outputs on the row's inputs (``logits``: last position or class logits)."""
    try:
        import torch
        import transformers
    except ImportError as err:
        raise PumaError(f"puma bench peers needs torch and transformers (pip install -e '.[test]'): {err}") from None
    family, config = _config(row, layers)
    hf_config = config.to_hf()
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, HF_CLASSES[(family, row.task)][1])(hf_config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    x = inputs(row, config.vocab_size)
    with torch.no_grad():
        model = model.double()
        kwargs = {"input_ids": torch.tensor(x["input_ids"], dtype=torch.long)}
        if row.task == "classify":
            kwargs["token_type_ids"] = torch.tensor(x["token_type_ids"], dtype=torch.long)
            kwargs["attention_mask"] = torch.tensor(x["attention_mask"], dtype=torch.long)
        logits = model(**kwargs).logits.numpy()
    return {"logits": logits if row.task == "classify" else logits[:, -1]}


# -- one cell, in its own process -----------------------------------------------------------------


def _measure(session, program: Program, secret: dict, public: dict) -> tuple[dict, dict]:
    """One measured run (its compilation is timed apart): (revealed outputs, cost fields)."""
    with LoadMonitor() as machine, session.measure() as cost:
        out = session.run(program, secret, public)
    report = profiled(cost).to_dict()
    return out, {
        "bytes_sent": report["total_bytes_sent"],
        "send_actions": report["total_send_actions"],
        "max_party_send_actions": max(p["send_actions"] for p in report["per_party"]),
        "per_party": report["per_party"],
        "client_upload_bytes": report["client_upload_bytes"],
        "client_download_bytes": report["client_download_bytes"],
        "run_s": round(report["wall_s"], 2),
        "compile_s": report["compile_s"],
        "load": machine.report(),
        "per_op": {
            op: {"bytes_sent": v["bytes_sent"], "send_actions": v["send_actions"]} for op, v in report["per_op"].items()
        },
        "peak_rss": report["peak_rss"],
    }


def _hf_cell(peer: str, row: PeerRow, folder: str, layers: int | None) -> dict:
    """A peer path: transformers' Flax model of ``folder`` under SPU."""
    import jax.numpy as jnp
    import transformers

    from puma.runtime import open_session

    family, config = _config(row, layers)
    _, settings, substituted = PEERS[peer]
    model = getattr(transformers, HF_CLASSES[(family, row.task)][0]).from_pretrained(folder, from_pt=True)
    x = inputs(row, config.vocab_size)
    calls: collections.Counter = collections.Counter()

    def fn(params, state, secret, public):
        calls["traces"] += 1
        if row.task == "classify":
            logits = model(
                input_ids=secret["input_ids"],
                token_type_ids=secret["token_type_ids"],
                attention_mask=public["attention_mask"],
                params=params,
            ).logits  # [B, labels]
            return {"logits": logits}, {}
        logits = model(input_ids=secret["input_ids"], params=params).logits[:, -1]  # [B, V]
        return {"logits": logits, "token": jnp.argmax(logits, axis=-1)}, {}

    secret = {"input_ids": x["input_ids"]}
    if row.task == "classify":
        secret["token_type_ids"] = x["token_type_ids"]
    public = {"attention_mask": x["attention_mask"]} if row.task == "classify" else {}
    patches = puma_substitutions(calls) if substituted else contextlib.nullcontext()
    with open_session("sim", spu_settings=settings) as session, patches:
        session.load_params(model.params)
        out, cost = _measure(session, Program(f"peer_{peer}_{family}", fn), secret, public)
    traces = max(calls.pop("traces", 1), 1)
    per_trace = {name: count // traces for name, count in sorted(calls.items())}
    if substituted and layers != 0:  # a model cut to 0 layers has no attention or MLP
        missing = [name for name in EXPECTED_CALLS[family] if not per_trace.get(name)]
        if missing:
            raise PumaError(
                f"PUMA's {', '.join(missing)} substitution never ran in {HF_CLASSES[(family, row.task)][0]}: "
                "transformers no longer looks it up where puma patches it"
            )
    return {**cost, "calls_per_trace": per_trace, **{k: np.asarray(v).tolist() for k, v in out.items()}}


def _puma_cell(approx: str, row: PeerRow, folder: str, layers: int | None) -> dict:
    """One of puma's sets: puma's model of ``folder`` (resident weights) under SPU."""
    from puma import tasks
    from puma.api import SecureModel

    ops = protocols.get(approx)
    if layers is not None:  # a layer row's cut stands for a middle layer: no last-layer saving
        ops = ops.as_middle_layer()
    with SecureModel.from_pretrained(folder, approx=ops, backend="sim", weights="resident") as m:
        config = m.model.config
        x = inputs(row, config.vocab_size)
        ids, mask = x["input_ids"], x["attention_mask"]
        positions = tasks.positions_from_mask(mask)
        if row.task == "classify":
            program = tasks.encoder_program(m.model, m.ops, "classify")
            secret = {
                "input_ids": tasks.client_ids(m.ops, ids, config.vocab_size),
                "token_type_ids": tasks.client_ids(m.ops, x["token_type_ids"], config.type_vocab_size),
            }
        else:
            program = _last_logits_and_token(m.model, m.ops)
            secret = {"input_ids": tasks.client_ids(m.ops, ids, config.vocab_size)}
        out, cost = _measure(m.session, program, secret, {"attention_mask": mask, "position_ids": positions})
    if "output" in out:
        out = {"logits": out.pop("output")}
    return {**cost, **{k: np.asarray(v).tolist() for k, v in out.items()}}


def _last_logits_and_token(model, ops) -> Program:
    """puma's causal LM revealing what the peers reveal: last logits and the greedy token."""
    module = model.module(ops)

    def fn(params, state, secret, public):
        logits, _ = module.apply(
            {"params": params}, secret["input_ids"], public["attention_mask"], public["position_ids"], last_only=True
        )
        last = logits[:, -1]  # [B, V]
        return {"logits": last, "token": module.ops.argmax(last)}, {}

    return Program(f"{model.family}_peer_logits_token", fn, key=(ops.name, model.program_key))


def cell(path: str, row: PeerRow, folder: str, layers: int | None) -> dict:
    """The cell of ``path`` (a peer or a puma set) on ``row``, in this process."""
    if path in PEERS:
        return _hf_cell(path, row, folder, layers)
    return _puma_cell(path, row, folder, layers)


# -- the table ------------------------------------------------------------------------------------

#: Cost fields a layer row takes as the difference of its 1- and 0-layer runs.
DIFFERENCED = ("bytes_sent", "send_actions", "run_s")  # the client's I/O is that of one run


def errors(out: dict, reference: dict) -> dict:
    """Logit errors of a path against the float64 reference, and top-1 agreement."""
    got = np.asarray(out["logits"], np.float64)
    ref = np.asarray(reference["logits"], np.float64)
    diff = float(np.abs(got - ref).max())
    result = {
        "max_abs": diff,
        "relative": diff / max(float(np.abs(ref).max()), 1e-12),
        "top1_agrees": bool((got.argmax(-1) == ref.argmax(-1)).all()),
    }
    if "token" in out:
        result["token_agrees"] = bool((np.asarray(out["token"]).reshape(-1) == ref.argmax(-1)).all())
    return result


def _combined(one: dict, zero: dict | None) -> dict:
    """A cell's reported cost: the run itself, or for a layer row the 1-layer minus 0-layer run
    (per party too; the busiest party is the one whose difference is largest)."""
    if zero is None:
        return one
    out = dict(one)
    for key in DIFFERENCED:
        out[key] = round(one[key] - zero[key], 2) if isinstance(one[key], float) else one[key] - zero[key]
    out["per_party"] = [
        {**p, "bytes_sent": p["bytes_sent"] - q["bytes_sent"], "send_actions": p["send_actions"] - q["send_actions"]}
        for p, q in zip(one["per_party"], zero["per_party"])
    ]
    out["max_party_send_actions"] = max(p["send_actions"] for p in out["per_party"])
    out["per_op"] = {op: {k: v[k] - zero["per_op"].get(op, {}).get(k, 0) for k in v} for op, v in one["per_op"].items()}
    out["load"] = {**one["load"], "contended": one["load"]["contended"] or zero["load"]["contended"]}
    return out


def ratios(cells: dict[str, dict], sets, peers) -> dict:
    """{"<set>/<peer>": {"bytes", "send_actions", "seconds"}} from cells of one run."""
    out = {}
    for s in sets:
        for p in peers:
            if s in cells and p in cells:
                a, b = cells[s], cells[p]
                out[f"{s}/{p}"] = {
                    "bytes": round(a["bytes_sent"] / b["bytes_sent"], 3),
                    "send_actions": round(a["max_party_send_actions"] / b["max_party_send_actions"], 3),
                    "seconds": round(a["run_s"] / b["run_s"], 3) if b["run_s"] else None,
                }
    return out


@dataclasses.dataclass(frozen=True)
class Target:
    """A communication target on one row's path: at most ``limit`` of ``metric``, or at most
    ``ratio`` times another path's (``relative_to``) measured in the same run."""

    row: str
    path: str
    metric: str  # "bytes_sent" or "max_party_send_actions"
    limit: float | None = None
    relative_to: str | None = None
    ratio: float | None = None

    def bound(self, cells: dict) -> float | None:
        if self.limit is not None:
            return self.limit
        other = cells.get(self.relative_to)
        return None if other is None else self.ratio * other[self.metric]

    def describe(self) -> str:
        what = {"bytes_sent": "bytes", "max_party_send_actions": "send actions of the busiest party"}[self.metric]
        if self.limit is not None:
            return f"{self.row} {self.path}: {what} <= {self.limit / 1e9:.2f} GB"
        return f"{self.row} {self.path}: {what} <= {self.ratio:.3g} x {self.relative_to}'s"


#: Issue 15's targets (communication round 2), evaluated wherever their row and paths exist.
TARGETS = (
    Target("llama-7b-layer", "puma-lean", "bytes_sent", relative_to="puma-code", ratio=0.5),
    Target("bert-base", "puma-lean", "bytes_sent", limit=3.6e9),
    Target("gpt2", "puma-lean", "bytes_sent", limit=0.75e9),
    Target("bert-base", "puma-lean", "max_party_send_actions", relative_to="puma-fast", ratio=2 / 3),
    Target("gpt2", "puma-lean", "max_party_send_actions", relative_to="puma-fast", ratio=2 / 3),
)


def targets(result_cells: dict) -> list[dict]:
    """Each target whose row and paths were measured: the bound, the measurement, met or by
    how much it was missed (relative to the bound)."""
    out = []
    for t in TARGETS:
        row = result_cells.get(t.row)
        if row is None or t.path not in row["paths"]:
            continue
        bound = t.bound(row["paths"])
        if bound is None:
            continue
        got = row["paths"][t.path][t.metric]
        out.append(
            {
                "target": t.describe(),
                "bound": round(bound, 1),
                "measured": got,
                "met": got <= bound,
                "miss": None if got <= bound else round(got / bound - 1.0, 3),
            }
        )
    return out


def run(
    rows=("gpt2", "bert-base"),
    peers=("puma-code", "spu-example"),
    sets=("puma", "puma-fast"),
    out: str = "bench-results/peers.json",
    resume: bool = True,
    quiet: bool = False,
) -> dict:
    """Measure every path on every row (each cell in its own process; resumable). A row's
    cells are kept together: its ratios come from the cells of one invocation, so a row whose
    cells were not all measured in this one is measured again."""
    for name in rows:
        if name not in ROWS:
            raise PumaError(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
    for path in peers:
        if path not in PEERS:
            raise PumaError(f"unknown peer {path!r}; peers: {', '.join(PEERS)}")
    for s in sets:
        protocols.get(s)
    paths = [*peers, *sets]
    store = CellStore(out, {"backend": "sim", "protocol": "aby3/FM64/18", "paths": paths}, resume=resume)
    todo = [name for name in rows if not store.holds(name)]
    for name in tqdm(todo, desc="peer table", unit="row"):
        store.put(name, _measure_row(ROWS[name], peers, sets, quiet))
    for row in store.cells.values():  # the network model applied to every cell, as it is now
        for cell in row["paths"].values():
            cell["network_s"] = {k: round(v, 2) for k, v in network.cell_times(cell, network.NETWORKS).items()}
    store.data["targets"] = targets(store.cells)
    store.save()
    return store.data


def _measure_row(row: PeerRow, peers, sets, quiet: bool) -> dict:
    paths = [*peers, *sets]
    cuts = (1, 0) if row.layer else (None,)
    raw: dict[str, dict] = {p: {} for p in paths}
    references = {}
    with tempfile.TemporaryDirectory(prefix="puma-peers-") as tmp:
        for layers in cuts:
            folder = os.path.join(tmp, f"layers-{layers}")
            references[layers] = run_isolated(save_reference, row, layers, folder, what="the PyTorch reference")
            for path in paths:
                if quiet and not wait_quiet(600):
                    raise PumaError("the machine stayed busy for 10 minutes: other processes take CPU time (see top)")
                log.info("%s: %s (%s layers)", row.name, path, "all" if layers is None else layers)
                raw[path][layers] = run_isolated(cell, path, row, folder, layers, what=f"{row.name} on {path}")
    cells = {}
    for path in paths:
        first = raw[path][cuts[0]]
        measured = _combined(first, raw[path].get(0) if row.layer else None)
        if row.layer:
            measured["cuts"] = {
                str(n): {k: raw[path][n][k] for k in ("bytes_sent", "max_party_send_actions", "run_s")} for n in cuts
            }
        measured["errors"] = errors(first, references[cuts[0]])
        for key in ("logits", "token"):
            measured.pop(key, None)
        cells[path] = measured
    return {
        "tokens": row.tokens,
        "task": row.task,
        "layer": row.layer,
        "paths": cells,
        "ratios": ratios(cells, sets, peers),
    }


def add_arguments(p) -> None:
    from puma import options

    p.add_argument("--rows", nargs="+", default=["gpt2", "bert-base"], choices=list(ROWS), help="default: %(default)s")
    p.add_argument(
        "--peers", nargs="+", default=["puma-code", "spu-example"], choices=list(PEERS), help="default: %(default)s"
    )
    options.add_sets_arg(p, ["puma", "puma-fast"])
    options.add_quiet_arg(p)


def main(args) -> dict:
    return run(args.rows, args.peers, args.sets, args.out, resume=args.resume, quiet=args.require_quiet)


def markdown(result: dict) -> str:
    """The peer table and the ratios, from one run's JSON."""
    lines = [
        "Peers in one run (sim backend, ABY3/FM64/18, each path in its own process): total bytes sent by all "
        "parties, the client's upload/download, send actions of the busiest party, wall seconds "
        "(compilation excluded; * = contended), modelled LAN/WAN seconds (puma/network.py), and the "
        "error of the revealed logits against transformers' PyTorch model in float64.",
        "",
        "| model | path | GB | client up / down MB | send actions (max party) | seconds | "
        + " | ".join(f"{n.describe()} s" for n in network.NETWORKS.values())
        + " | max abs logit error (relative) | top-1 agrees | substitutions per trace |",
        "|---|---|---|---|---|---|" + "---|" * len(network.NETWORKS) + "---|---|---|",
    ]
    for name, row in result["cells"].items():
        label = f"{name} ({row['tokens']} tokens{', one layer' if row['layer'] else ''})"
        for path, c in row["paths"].items():
            err = c["errors"]
            calls = ", ".join(f"{k} {v}" for k, v in c.get("calls_per_trace", {}).items()) or "-"
            times = " | ".join(f"{c['network_s'][k]:.1f}" for k in network.NETWORKS)
            lines.append(
                f"| {label} | {path} | {c['bytes_sent'] / 1e9:.3f} | "
                f"{c['client_upload_bytes'] / 1e6:.2f} / {c['client_download_bytes'] / 1e6:.2f} | "
                f"{c['max_party_send_actions']} | {c['run_s']:.1f}{'*' if c['load']['contended'] else ''} | "
                f"{times} | {err['max_abs']:.2e} ({err['relative']:.1e}) | "
                f"{'yes' if err['top1_agrees'] else 'no'} | {calls} |"
            )
    lines += [
        "",
        "The PUMA paper's own figures (arXiv 2307.12533, Tables 3-4; other hardware, SPU version and counting) "
        "stand beside: BERT-base/128 10.773 GB in 33.9 s, GPT-2 at 32 tokens 3.774 GB in 15.5 s.",
        "",
        "| model | puma set / peer | bytes | send actions | seconds |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["cells"].items():
        for pair, r in row["ratios"].items():
            seconds = f"{r['seconds']:.2f}" if r["seconds"] is not None else "-"
            lines.append(f"| {name} | {pair} | {r['bytes']:.2f} | {r['send_actions']:.2f} | {seconds} |")
    checks = targets(result["cells"])
    if checks:
        lines += ["", "Targets (issue 15):", ""]
        for t in checks:
            verdict = "met" if t["met"] else f"missed by {100 * t['miss']:.0f} %"
            lines.append(f"- {t['target']}: {t['measured']:,} against {t['bound']:,.0f}: {verdict}")
        lines += ["", "Where the bytes go (MB per op, all parties; the largest five per path):", ""]
        lines += ["| model | path | " + " | ".join(f"op {i + 1}" for i in range(5)) + " |", "|---|---|" + "---|" * 5]
        for name, row in result["cells"].items():
            for path, c in row["paths"].items():
                top = sorted(c["per_op"].items(), key=lambda kv: -kv[1]["bytes_sent"])[:5]
                ops = [f"{k.removeprefix('pphlo.')} {v['bytes_sent'] / 1e6:.1f}" for k, v in top]
                lines.append(f"| {name} | {path} | " + " | ".join(ops) + " |")
    return "\n".join(lines)
