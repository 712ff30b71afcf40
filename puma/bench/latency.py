"""Latency of private generation per token: rounds, bytes and seconds of the prefill and of each
decode step, where a decode step's cost goes by model site, and the first token of a new process
with and without puma's caches (issue 29).

For each model and approximation set, on ``sim`` (ABY3, in the fixed-point format the
calibration preflight picks; the cell records it):

1. **Steps.** One greedy generation (:meth:`SecureModel.generate`, the CLI's path and buckets):
   the prefill and every decode step with the busiest party's send actions (the rounds of
   :mod:`puma.network`), all parties' send actions, bytes, the simulation's wall seconds and the
   seconds modelled under a LAN (1 ms, 10 Gbit/s) and a WAN (40 ms, 400 Mbit/s); the pphlo ops of
   the last decode step that send most often and that take most seconds.
2. **Sites.** Each site of one decode step (norms, projections, rotary embedding, attention
   products, softmax, activation, head, embedding; the query/key norms where the family has them;
   a token table streamed in row blocks as the model reads it) run as a program of its own in the same
   session, at the decode step's shapes (one token against the cache slots the generation
   used), with secret random inputs of the real shapes in realistic ranges, times its count per
   step. Beside the sum: the decode steps' measured figure; the difference is what the site
   model does not attribute (residual additions, the cache update, per-run overheads).
3. **First token.** ``puma generate -n 1 --json`` as a new process twice with an empty
   ``PUMA_CACHE``: cold (calibration and compilation), then warm (calibrated ranges and compiled
   programs on disk: :mod:`puma.runtime.compile_cache`); each process's wall seconds and the
   ``compile_s`` its JSON reports.

SmolLM2's decode step is also the per-token cost of the README's chat example (``puma generate
-m smollm2 -p "What is the capital of France?" --chat -n 16``): every token after the first is
one decode step; its longer (templated) prompt gives the attention a longer cache, which the
cell states.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from puma import network, protocols, tasks
from puma.api import SecureModel, default_approx
from puma.bench import data
from puma.bench.load import LoadMonitor, wait_quiet
from puma.bench.report import CellStore, profiled
from puma.errors import PumaError
from puma.models import layers
from puma.models.llama import RotaryDecoderConfig
from puma.program import Program
from puma.runtime.params import flatten

log = logging.getLogger(__name__)

#: name -> (source, what it stands for); stories260K is read from the data folder.
MODELS = {
    "stories260K": ("stories260K.gguf", "stories260K (trained LLaMA, 5 layers, GQA; the quick row)"),
    "smollm2-135m": ("smollm2", "SmolLM2-135M-Instruct (trained LLaMA, 30 layers, GQA, tied head)"),
    "gemma3-270m": (
        "gemma3",
        "Gemma 3 270M (trained; 18 layers, gated tanh-GeLU, 262 144-token tied table read in row blocks; "
        "Gemma terms: benchmark use only)",
    ),
}
#: The rows a plain ``puma bench latency`` measures (Gemma 3's, at FM128 with streamed weights,
#: takes about an hour with its first-token runs: ask for it with ``--models gemma3-270m``).
DEFAULT_MODELS = ("stories260K", "smollm2-135m")
#: The models whose cells include a conversation of two turns (chat models: a chat template).
CONVERSATION_MODELS = ("smollm2-135m",)
#: The networks the steps are modelled under (:data:`puma.network.NAMED`): 1 ms, 10 Gbit/s; 40 ms, 400 Mbit/s.
NETWORKS = ("lan-10g", "wan")
#: The prompt: its first ``--prompt-tokens`` tokens (random ids for a model without a tokenizer).
PROMPT_TEXT = "Once upon a time, there was a little girl named Lily. She loved to play in the park with her friends."
#: The README's chat example, whose per-token cost the decode step stands for.
CHAT_EXAMPLE = ("What is the capital of France?", 16)
#: The chat example's follow-up: the second turn of the conversation cell (``puma chat``).
FOLLOW_UP = "And of Italy?"
#: Seconds one ``puma generate`` process may take before it is killed.
PROCESS_TIMEOUT_S = 3600.0
TOP_OPS = 5

SITES_NOTE = (
    "sites are measured one program each at the decode step's shapes and multiplied by their count per step; "
    "not_attributed = the decode steps' measured mean - the sum of the sites (residual additions, the cache "
    "update; negative where the sites' own runs cost more, such as each run's fixed overhead); seconds are the "
    "largest of the three parties' own execution seconds of a run"
)


#: The set with the fewest messages per token: the "after" row beside puma-fast's "before".
AFTER = "puma-chat"


def default_sets() -> list[str]:
    """``puma-fast`` (the before row) and :data:`AFTER` (the after row)."""
    return ["puma-fast", AFTER]


def role(approx: str) -> str:
    """``before`` for puma-fast, ``after`` for :data:`AFTER`."""
    return {"puma-fast": "before", AFTER: "after"}.get(approx, "")


# -- the prompt ------------------------------------------------------------------------------


def prompt_for(model, tokens: int) -> tuple[str | None, list[int]]:
    """(text, ids): the first ``tokens`` tokens of :data:`PROMPT_TEXT` as the model tokenizes
    text (BOS included) and the text they decode to; (None, seeded random ids) without a tokenizer."""
    if model.tokenizer is None:
        vocab = model.config.vocab_size
        return None, np.random.default_rng(0).integers(10, max(11, min(vocab, 500)), tokens).tolist()
    text = " ".join([PROMPT_TEXT] * (1 + tokens // 16))  # enough text for any length asked
    ids = list(model.tokenizer(text)["input_ids"])[:tokens]
    text = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
    return text, tasks.encode_prompts(model, [text])[0]


def decode_shapes(config, prompt_tokens: int, decode_steps: int) -> dict:
    """The shapes :func:`puma.tasks.generate` runs a generation of ``decode_steps + 1`` tokens
    with (default buckets): the padded prompt, the cache slots every decode step attends over,
    the last decode step's slot and position id, and the slots it sees (left padding and later
    slots masked)."""
    new = decode_steps + 1
    prompt_len = min(tasks.bucket(prompt_tokens, 8), config.max_positions - new + 1)
    slots = min(tasks.bucket(prompt_len + new - 1, 16), config.max_positions)
    last = prompt_len + decode_steps - 1  # the last decode step's slot
    first = prompt_len - prompt_tokens  # the prompt's first token (left padding before it)
    valid = [first <= s <= last for s in range(slots)]
    return {
        "prompt_len": prompt_len,
        "cache_slots": slots,
        "last_index": last,
        "position": last - first,
        "valid": valid,
    }


# -- steps -----------------------------------------------------------------------------------


def _party_s(report) -> tuple[float, float]:
    """(busiest party's seconds, all parties' seconds) of a cost report."""
    seconds = [p.seconds for p in report.per_party or []]
    return max(seconds, default=0.0), sum(seconds)


def step_figures(brief: dict, report) -> dict:
    """One step's figures: the ``step_costs`` entry as it is, the client's I/O, the parties'
    seconds and the modelled seconds per network (:func:`puma.network.estimate`: compute seconds
    + busiest party's send actions x RTT + (its bytes + the client's) / bandwidth)."""
    compute = max(0.0, brief["wall_s"] - brief.get("weight_s", 0.0))
    busiest_s, party_s = _party_s(report)
    out = {
        **brief,
        "compute_s": round(compute, 4),
        "io_bytes": report.io_bytes,
        "max_party_s": round(busiest_s, 4),
        "party_s": round(party_s, 4),
    }
    moved = brief["max_party_bytes_sent"] + report.io_bytes
    out["modelled_s"] = {
        key: round(network.estimate(compute, brief["max_party_send_actions"], moved, network.NAMED[key]), 4)
        for key in NETWORKS
    }
    return out


def mean_step(steps: list[dict]) -> dict:
    """The mean of steps' numeric figures (the modelled seconds per network too)."""
    keys = [k for k, v in steps[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out = {k: sum(s[k] for s in steps) / len(steps) for k in keys}
    out["modelled_s"] = {k: sum(s["modelled_s"][k] for s in steps) / len(steps) for k in steps[0]["modelled_s"]}
    out["steps"] = len(steps)
    return out


def top_ops(report, n: int = TOP_OPS) -> dict:
    """The ``n`` pphlo ops of a step with the most send actions and the most seconds (summed over
    the parties): count, seconds, bytes, send actions each."""

    def row(name, op):
        return {
            "op": name,
            "count": op.count,
            "send_actions": op.send_actions,
            "bytes_sent": op.bytes_sent,
            "seconds": round(op.seconds, 4),
        }

    ops = report.per_op.items()
    return {
        "by_send_actions": [row(k, v) for k, v in sorted(ops, key=lambda kv: (-kv[1].send_actions, kv[0]))[:n]],
        "by_seconds": [row(k, v) for k, v in sorted(ops, key=lambda kv: (-kv[1].seconds, kv[0]))[:n]],
    }


def measure_generation(m: SecureModel, text: str | None, ids: list[int], decode_steps: int) -> tuple[dict, object]:
    """One generation of ``decode_steps + 1`` tokens (the prefill and ``decode_steps`` decode
    steps) through the API's path (text through :meth:`SecureModel.generate`, ids without a
    tokenizer): (its figures, the :class:`~puma.tasks.GenerationResult`)."""
    if text is not None:
        result = m.generate([text], max_new_tokens=decode_steps + 1)
    else:
        result = m.generate_ids([ids], max_new_tokens=decode_steps + 1)
    profiled(result.cost)
    if len(result.step_costs) != decode_steps + 1:
        raise PumaError(f"generation stopped at end-of-text after {len(result.step_costs)} step(s)")
    steps = [step_figures(b, r) for b, r in zip(result.step_costs, result.step_reports)]
    figures = {
        "steps": steps,
        "prefill": steps[0],
        "decode_mean": mean_step(steps[1:]) if decode_steps else None,
        "top_ops_last_decode": top_ops(result.step_reports[-1]),
        "tokens": result.tokens[0],
        "text": result.texts[0],
    }
    return figures, result


# -- sites -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Site:
    """One site of a decode step: ``call(secret, public)`` on the client's secret inputs and
    public ones, run ``count`` times per step."""

    name: str
    what: str
    count: int
    call: Callable
    secret: dict
    public: dict = dataclasses.field(default_factory=dict)


def _normal(rng, shape, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def site_embedding(config, ops, rng, blocks=()) -> Site:
    """The token's embedding row: one-hot row [1, V] times the table [V, D] for sets whose
    client one-hot encodes (``ops.plan.client_onehot``), else the set's secret lookup. With the
    table in row ``blocks`` (:meth:`~puma.runtime.base.Session.table_blocks`), one block's
    lookup, counted once per block, as :mod:`puma.staged` runs it."""
    vocab, hidden = config.vocab_size, config.hidden_size
    rows = max((stop - start for start, stop in blocks), default=vocab)  # the largest block's
    ids = tasks.client_ids(ops, rng.integers(0, rows, (1, 1)), rows)
    how = "one-hot row [1, V] x table [V, D]" if ops.plan.client_onehot else "the set's lookup of a secret id"
    where = f"per row block of up to {rows} (of {len(blocks)})" if blocks else "once"
    return Site(
        "embedding",
        f"{how}, {where} per step",
        max(1, len(blocks)),
        lambda s, p: ops.embed(s["ids"], s["table"]),
        {"ids": ids, "table": _normal(rng, (rows, hidden), 0.02)},
    )


def site_norm(config, ops, rng, per_layer: int) -> Site:
    """RMSNorm of one row [1, 1, D] (mean square about 1): ``per_layer`` per block (LLaMA 2,
    Gemma 3 4) and the final one."""
    return Site(
        "norm",
        f"ops.rms_norm on [1, 1, D]; {per_layer} per layer + the final norm",
        per_layer * config.num_hidden_layers + 1,
        lambda s, p: ops.rms_norm(s["x"], s["w"], config.rms_norm_eps),
        {
            "x": _normal(rng, (1, 1, config.hidden_size)),
            "w": rng.uniform(0.5, 1.5, config.hidden_size).astype(np.float32),
        },
    )


def site_qk_norm(config, ops, rng) -> Site:
    """The per-head RMSNorms of the token's queries [1, 1, H, Dh] and keys [1, 1, Hkv, Dh]
    (Qwen3, Gemma 3: ``config.qk_norm``); per layer."""
    heads, kv_heads, dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    eps = config.rms_norm_eps
    return Site(
        "query/key norms",
        "ops.rms_norm over each query and key head's Dh; per layer",
        config.num_hidden_layers,
        lambda s, p: (ops.rms_norm(s["q"], s["wq"], eps), ops.rms_norm(s["k"], s["wk"], eps)),
        {
            "q": _normal(rng, (1, 1, heads, dh)),
            "k": _normal(rng, (1, 1, kv_heads, dh)),
            "wq": rng.uniform(0.5, 1.5, dh).astype(np.float32),
            "wk": rng.uniform(0.5, 1.5, dh).astype(np.float32),
        },
    )


def site_norm_shift(config, ops, rng, shift: int, count: int) -> Site:
    """The public power-of-two pre-scale of a norm's input (:func:`~puma.protocols.base.prescale`,
    a truncation when it shrinks) at the norms the calibration shifts."""
    from puma.protocols.base import prescale

    return Site(
        "norm pre-scale",
        f"x 2^-{shift} before a norm (calibrated shift), at {count} norm(s)",
        count,
        lambda s, p: prescale(s["x"], config.rms_norm_eps, shift)[0],
        {"x": _normal(rng, (1, 1, config.hidden_size), 2.0**shift)},
    )


def site_projections(config, ops, rng) -> Site:
    """One layer's products with secret weights of the real shapes: q/k/v (one product when
    ``ops.plan.fused_projections``), o, gate/up (one product when fused), down."""
    d, i = config.hidden_size, config.intermediate_size
    q_out, kv_out = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    fused = getattr(ops.plan, "fused_projections", False)
    kernels = {"o": (q_out, d), "down": (i, d)}
    if fused:
        kernels.update(qkv=(d, q_out + 2 * kv_out), gate_up=(d, 2 * i))
    else:
        kernels.update(q=(d, q_out), k=(d, kv_out), v=(d, kv_out), gate=(d, i), up=(d, i))
    secret = {f"w_{name}": _normal(rng, shape, 0.02) for name, shape in kernels.items()}
    secret.update(x=_normal(rng, (1, 1, d)), x_o=_normal(rng, (1, 1, q_out)), x_down=_normal(rng, (1, 1, i)))

    def call(s, p):
        inputs = {"o": s["x_o"], "down": s["x_down"]}
        return [jnp.einsum("...i,io->...o", inputs.get(name, s["x"]), s[f"w_{name}"]) for name in kernels]

    names = "q/k/v in one, o, gate/up in one, down" if fused else "q, k, v, o, gate, up, down"
    what = f"{names}: [1, in] x [in, out] secret; per layer"
    return Site("projections", what, config.num_hidden_layers, call, secret)


def site_rotary(config, ops, rng, position: int) -> Site:
    """The rotary embedding of the token's query and key heads at ``position``, as the model
    applies it (with the query's 1/sqrt(Dh) when ``ops.plan.fused_rotary`` folds it in)."""
    from puma.models import llama

    heads, kv_heads, dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    cos_table, sin_table = llama.rotary_tables(config)
    cos, sin = cos_table[position][None, None], sin_table[position][None, None]  # [1, 1, Dh]
    fused = getattr(ops.plan, "fused_rotary", False)

    def call(s, p):
        if fused:  # the model's own path: a product by a public block-diagonal matrix for one token
            return llama.LlamaAttention.rotate_scaled(None, s["q"], s["k"], cos, sin, slice(None))
        return llama.rotate(s["q"], cos, sin), llama.rotate(s["k"], cos, sin)

    how = "one product by a public rotation (query scale folded in)" if fused else "x cos + rotate_half(x) sin"
    return Site(
        "rotary",
        f"queries and keys of the token: {how}; per layer",
        config.num_hidden_layers,
        call,
        {"q": _normal(rng, (1, 1, heads, dh)), "k": _normal(rng, (1, 1, kv_heads, dh))},
    )


def site_attention(config, ops, rng, slots: int, valid: list[bool]) -> Site:
    """The two attention products of one layer against ``slots`` cache slots (scores Q K^T and
    the values P V) through the model's own :func:`~puma.models.layers.attend` with the softmax
    taken out (fused heads and grouped queries as the set runs them)."""
    from puma.models.layers import attend

    heads, kv_heads, dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    no_softmax = dataclasses.replace(ops, softmax=lambda x, where=None: x)
    scaled = {"scaled": True} if getattr(ops.plan, "fused_rotary", False) else {}
    return Site(
        "attention products",
        f"scores q K^T and values P V against {slots} cache slots; per layer",
        config.num_hidden_layers,
        lambda s, p: attend(s["q"], s["k"], s["v"], p["mask"].astype(bool), no_softmax, **scaled),
        {
            "q": _normal(rng, (1, 1, heads, dh)),
            "k": _normal(rng, (1, slots, kv_heads, dh)),
            "v": _normal(rng, (1, slots, kv_heads, dh)),
        },
        {"mask": np.asarray(valid, np.int32).reshape(1, 1, 1, slots)},
    )


def site_softmax(config, ops, rng, slots: int, valid: list[bool]) -> Site:
    """The set's softmax over one token's scores in [-10, 10]: [1, Hkv, G, 1, S] (every query
    head's row), with the step's mask."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    shape = (1, kv_heads, heads // kv_heads, 1, slots)
    return Site(
        "softmax",
        f"ops.softmax over {heads} heads x {slots} slots, masked; per layer",
        config.num_hidden_layers,
        lambda s, p: ops.softmax(s["x"], p["mask"].astype(bool)),
        {"x": rng.uniform(-10.0, 10.0, shape).astype(np.float32)},
        {"mask": np.asarray(valid, np.int32).reshape(1, 1, 1, 1, slots)},
    )


def site_activation(config, ops, rng) -> Site:
    """The gated activation act(gate) * up on [1, 1, I]; per layer."""
    act = ops.activation(config.hidden_act)
    shape = (1, 1, config.intermediate_size)
    return Site(
        "activation",
        f"ops.{config.hidden_act}(gate) * up on [1, I]; per layer",
        config.num_hidden_layers,
        lambda s, p: act(s["gate"]) * s["up"],
        {"gate": _normal(rng, shape, 2.0), "up": _normal(rng, shape)},
    )


def site_head(config, ops, rng, blocks=()) -> Site:
    """The LM head product [1, D] x [D, V] (the table's transpose when tied) and the set's
    argmax over the vocabulary (greedy, token revealed); the final norm is in ``norm``. With
    the tied table in row ``blocks``, each block's product against its own row of the input
    (distinct operands: no product is shared) and the argmax over the joined logits, as
    :mod:`puma.staged` runs them."""
    vocab, hidden = config.vocab_size, config.hidden_size
    sizes = [stop - start for start, stop in blocks]
    if config.tie_word_embeddings:  # the model's own tied projection (its operand layout matters)
        rows = max(sizes, default=vocab)
        shape = (rows, hidden)

        def logits(x, w):
            return layers.Embedding(w.shape[0], hidden).apply({"params": {"embedding": w}}, x, method="attend")

    else:
        shape = (hidden, vocab)

        def logits(x, w):
            return jnp.einsum("td,dv->tv", x, w)

    if config.tie_word_embeddings and blocks:  # [1, D] against each block: [1, rows] each, joined [1, V']

        def call(s, p):  # block k: the first sizes[k] rows of one secret block, against x's row k
            parts = [logits(s["x"][k : k + 1], s["w"][:size]) for k, size in enumerate(sizes)]
            return ops.argmax(jnp.concatenate(parts, -1))  # [1, V]

        what = f"LM head product [1, D] x [D, V] in {len(blocks)} row blocks of up to {rows} and ops.argmax over V"
        x = _normal(rng, (len(blocks), hidden))
    else:

        def call(s, p):
            return ops.argmax(logits(s["x"], s["w"]))

        what = "LM head product [1, D] x [D, V] and ops.argmax over V"
        x = _normal(rng, (1, hidden))
    return Site("head", f"{what}; once per step", 1, call, {"x": x, "w": _normal(rng, shape, 0.05)})


def block_norms(param_avals: dict) -> int:
    """RMSNorms per decoder block outside the attention, counted in the first block's weights
    (``*norm*/weight`` other than the query/key norms): LLaMA 2, Gemma 3 4."""
    names = [path for path in flatten(param_avals) if path.startswith("layers_0/")]
    return sum(1 for p in names if p.endswith("norm/weight") and p.split("/")[-2] not in ("q_norm", "k_norm"))


def decode_sites(config, ops, shapes: dict, *, per_layer: int = 2, shifts=None, blocks=(), seed: int = 0) -> list[Site]:
    """Every site of one decode step of a rotary decoder (LLaMA, Qwen, Gemma 3) ``config`` under
    ``ops`` at ``shapes`` (:func:`decode_shapes`): ``per_layer`` norms per block (:func:`block_norms`),
    the query/key norms where the family has them, the token table in row ``blocks`` when it
    streams so; ``shifts`` (the model's :class:`NormShifts`) adds the norms' shrinking pre-scales."""
    rng = np.random.default_rng(seed)
    slots, valid = shapes["cache_slots"], shapes["valid"]
    sites = [site_embedding(config, ops, rng, blocks), site_norm(config, ops, rng, per_layer)]
    shrinking = [k for k in (shifts.nonzero().values() if shifts else ()) if k > 0]
    if shrinking:  # a shift by k > 0 costs a truncation whatever k is; shifts < 0 are additions
        sites.append(site_norm_shift(config, ops, rng, max(shrinking), len(shrinking)))
    if getattr(config, "qk_norm", False):
        sites.append(site_qk_norm(config, ops, rng))
    sites += [
        site_projections(config, ops, rng),
        site_rotary(config, ops, rng, shapes["position"]),
        site_attention(config, ops, rng, slots, valid),
        site_softmax(config, ops, rng, slots, valid),
        site_activation(config, ops, rng),
        site_head(config, ops, rng, blocks),
    ]
    return sites


SITE_FIGURES = ("max_party_send_actions", "send_actions", "bytes_sent", "max_party_bytes_sent")


def measure_site(session, ops, site: Site) -> dict:
    """One run of ``site`` as its own program (after a run that compiles it), and the figures
    times its count per step: send actions and bytes (busiest party and all), party seconds."""
    program = Program(
        f"site_{site.name.replace(' ', '_')}",
        lambda params, state, secret, public: ({"y": site.call(secret, public)}, {}),
        key=("latency-site", ops.name, site.what),
        param_keys=(),
    )
    session.run(program, site.secret, site.public)
    with session.measure() as cost:
        session.run(program, site.secret, site.public)
    profiled(cost)
    parties = cost.per_party
    busiest_s, party_s = _party_s(cost)
    once = {
        "max_party_send_actions": max(p.send_actions for p in parties),
        "send_actions": cost.total_send_actions,
        "bytes_sent": cost.total_bytes_sent,
        "max_party_bytes_sent": max(p.bytes_sent for p in parties),
        "max_party_s": round(busiest_s, 5),
        "party_s": round(party_s, 5),
    }
    per_step = {k: once[k] * site.count for k in SITE_FIGURES}
    per_step.update(max_party_s=round(busiest_s * site.count, 4), party_s=round(party_s * site.count, 4))
    return {"what": site.what, "count": site.count, "once": once, "per_step": per_step}


def measure_sites(session, ops, sites: list[Site], step: dict, progress=None) -> dict:
    """Every site of ``sites``, their sum, and beside it ``step`` (the measured decode step,
    figures as :func:`mean_step` gives them) with the difference the sites do not attribute."""
    measured = {}
    for site in sites:
        measured[site.name] = measure_site(session, ops, site)
        if progress:
            progress(1)
    keys = (*SITE_FIGURES, "max_party_s", "party_s")
    total = {k: sum(s["per_step"][k] for s in measured.values()) for k in keys}
    whole = {k: step[k] for k in keys}
    return {
        "sites": measured,
        "sum": {k: round(v, 4) if isinstance(v, float) else v for k, v in total.items()},
        "measured_step": whole,
        "not_attributed": {k: round(whole[k] - total[k], 4) for k in keys},
        "note": SITES_NOTE,
    }


# -- first token in a new process ------------------------------------------------------------


def _kill(proc: subprocess.Popen) -> None:
    """Stop ``proc`` and its process group (it was started in a session of its own)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _cli_run(command: list[str], env: dict, timeout: float) -> dict:
    """Run ``command`` (a ``puma generate --json``) as a new process: its wall seconds and what
    its JSON says; killed (with its children) on timeout or any interruption."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise PumaError(f"puma generate took over {timeout:.0f} s: killed") from None
    except BaseException:
        _kill(proc)
        raise
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (err or "").strip().splitlines()[-1:] or ["no output"]
        raise PumaError(f"puma generate exited with status {proc.returncode}: {tail[0]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise PumaError("puma generate --json printed no JSON")
    payload = json.loads(lines[-1])
    stats = payload.get("stats", {})
    fixed = [line.split("fixed point ", 1)[1] for line in err.splitlines() if "puma: fixed point " in line]
    return {
        "process_s": round(wall, 2),
        "compile_s": stats.get("compile_s"),
        "run_s": round(stats.get("wall_s", 0.0), 3),
        "bytes_sent": stats.get("total_bytes_sent"),
        "tokens": payload.get("tokens"),
        "format": fixed[0].split(" (")[0] if fixed else None,
    }


def first_token(
    source: str,
    approx: str,
    text: str | None,
    ids: list[int],
    backend: str = "sim",
    connect: dict | None = None,
    timeout: float = PROCESS_TIMEOUT_S,
    quiet: bool = False,
) -> dict:
    """Seconds to the first token of ``puma generate -m source -n 1 --json`` in a new process,
    twice with one fresh ``PUMA_CACHE``: ``cold`` (nothing cached: calibration, compilation)
    and ``warm`` (the ranges and compiled programs the cold run left on disk). Each process is
    killed, with its children, if it takes over ``timeout`` seconds or the caller is stopped.
    ``quiet``: wait for a quiet machine first (up to 10 minutes), or refuse."""
    if quiet and not wait_quiet(600):
        raise PumaError("the machine stayed busy for 10 minutes: other processes take CPU time (see top)")
    connect = connect or {}
    command = [sys.executable, "-m", "puma", "generate", "-m", source, "-n", "1", "--json"]
    command += ["--approx", approx, "--backend", backend]
    command += ["-p", text] if text is not None else ["--ids", ",".join(map(str, ids))]
    if connect.get("config"):
        command += ["--config", connect["config"]]
    if connect.get("ray_address"):
        command += ["--ray-address", connect["ray_address"]]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="puma-latency-cache-") as cache:
        env = {**os.environ, "PUMA_CACHE": cache, "PUMA_COMPILE_CACHE": "1"}
        if connect.get("ray_token"):
            env["RAY_AUTH_TOKEN"] = connect["ray_token"]  # not on the command line
        with LoadMonitor() as machine:
            for which in ("cold", "warm"):
                runs[which] = _cli_run(command, env, timeout)
        programs = os.path.join(cache, "programs")
        cached = len(os.listdir(programs)) if os.path.isdir(programs) else 0
    shown = ["puma", *command[3:]]
    return {
        **runs,
        "command": " ".join(f"'{a}'" if " " in a else a for a in shown) + "  (PUMA_CACHE: a new empty folder)",
        "programs_cached": cached,
        "load": machine.report(),
    }


# -- cells -----------------------------------------------------------------------------------


def _config_summary(config) -> dict:
    return {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab": config.vocab_size,
        "tied_head": bool(config.tie_word_embeddings),
    }


def _chat_example(model) -> dict | None:
    """The README's chat example's prompt length and cache (tokenizer only, nothing runs)."""
    if not tasks.has_chat_template(model):
        return None
    question, new = CHAT_EXAMPLE
    tokens = len(tasks.encode_prompts(model, [question], chat=True)[0])
    prompt_len = min(tasks.bucket(tokens, 8), model.config.max_positions - new + 1)
    return {
        "command": f'puma generate -m smollm2 -p "{question}" --chat -n {new}',
        "prompt_tokens": tokens,
        "decode_steps": new - 1,
        "cache_slots": min(tasks.bucket(prompt_len + new - 1, 16), model.config.max_positions),
    }


def measure_cell(
    source: str,
    approx: str,
    backend: str = "sim",
    connect: dict | None = None,
    prompt_tokens: int = 5,
    decode_steps: int = 4,
    sites: bool = True,
    quiet: bool = False,
) -> dict:
    """The steps of one generation and (``sites``) the cost by site of one decode step, in one
    session of ``source`` under ``approx``."""
    if quiet and not wait_quiet(600):
        raise PumaError("the machine stayed busy for 10 minutes: other processes take CPU time (see top)")
    ops = protocols.get(approx)
    with SecureModel.from_pretrained(source, approx=ops, backend=backend, **(connect or {})) as m:
        model = m.model
        text, ids = prompt_for(model, prompt_tokens)
        shapes = decode_shapes(model.config, len(ids), decode_steps)
        with LoadMonitor(getattr(m.session.mesh, "pids", ())) as machine:
            figures, result = measure_generation(m, text, ids, decode_steps)
            cell = {
                "source": source,
                "approx": approx,
                "role": role(approx),
                "backend": backend,
                "protocol": result.cost.protocol,
                "format": m.fixed_plan.describe() if m.fixed_plan else None,
                "weights": m.weight_plan.mode if m.weight_plan else None,
                "config": _config_summary(model.config),
                "prompt": text if text is not None else ids,
                "prompt_tokens": len(ids),
                "decode_steps": decode_steps,
                **{k: v for k, v in shapes.items() if k != "valid"},
                **figures,
                "chat_example": _chat_example(model),
            }
            if sites and not isinstance(model.config, RotaryDecoderConfig):
                cell["sites"] = {"skipped": f"the sites are the rotary decoders' blocks; {source} is a {model.family}"}
            elif sites and m.session.mesh.remote_compile:
                cell["sites"] = {"skipped": f"{backend} runs only the parties' own programs: sites need sim or ray"}
            elif sites:
                avals = model.param_avals()
                blocks = m.session.table_blocks(model.module().stages().table or "")
                chosen = decode_sites(
                    model.config, ops, shapes, per_layer=block_norms(avals), shifts=model.shifts, blocks=blocks
                )
                shown = sys.stderr.isatty()
                with tqdm(total=len(chosen), desc="sites", unit="site", leave=False, disable=not shown) as bar:
                    cell["sites"] = measure_sites(m.session, ops, chosen, figures["decode_mean"], bar.update)
        cell["load"] = machine.report()
    return cell


def measure_conversation(
    source: str,
    approx: str,
    backend: str = "sim",
    connect: dict | None = None,
    quiet: bool = False,
    reply_tokens: int = CHAT_EXAMPLE[1],
) -> dict:
    """Two turns of ``puma chat`` (:class:`puma.conversation.Conversation`) in one session: the
    chat example's question, then :data:`FOLLOW_UP`, each reply at most ``reply_tokens`` (the
    example's).
    Per turn: the message's step (all its tokens in one step), the reply's decode steps (mean),
    the seconds to the reply's first token and the compile seconds in them (a new shape compiles
    once per process; the compile cache keeps it for the next), and the turn's compile seconds.
    Beside the second turn, ``restart``: the prefill a client that starts over runs (the whole
    conversation so far as one new prompt, in the same session; a new process adds the
    loading and sharing of the first-token cells)."""
    if quiet and not wait_quiet(600):
        raise PumaError("the machine stayed busy for 10 minutes: other processes take CPU time (see top)")
    question, new = CHAT_EXAMPLE[0], reply_tokens
    with SecureModel.from_pretrained(source, approx=approx, backend=backend, **(connect or {})) as m:
        if not tasks.has_chat_template(m.model):
            return {"skipped": f"{source} has no chat template"}
        with LoadMonitor(getattr(m.session.mesh, "pids", ())) as machine:
            turns = []
            with m.conversation() as talk:
                for message in (question, FOLLOW_UP):
                    held = len(talk.history)
                    turn = talk.say(message, new)
                    profiled(turn.cost)
                    steps = [step_figures(b, r) for b, r in zip(turn.step_costs, turn.step_reports)]
                    turns.append(
                        {
                            "message": message,
                            "message_tokens": turn.message_tokens,
                            "reply": turn.text,
                            "reply_tokens": len(turn.tokens),
                            "cache_slots": talk.slots,
                            "first_token_s": round(turn.first_token_s, 3),
                            "first_token_compile_s": round(turn.step_reports[0].compile_s, 3),
                            "compile_s": round(turn.cost.compile_s, 3),
                            "message_step": steps[0],
                            "decode_mean": mean_step(steps[1:]) if len(steps) > 1 else None,
                        }
                    )
                prompt = talk.history[: held + turn.message_tokens]
            with m.session.measure() as restart:
                again = m.generate_ids([prompt], 1)
            profiled(again.cost)
            figures = step_figures(again.step_costs[0], again.step_reports[0])
    return {
        "source": source,
        "approx": approx,
        "backend": backend,
        "protocol": restart.protocol,
        "command": f'printf "{question}\\n{FOLLOW_UP}\\n" | puma chat -m {source} -n {new} --approx {approx}',
        "turns": turns,
        "restart": {"prompt_tokens": len(prompt), "compile_s": round(restart.compile_s, 3), "prefill": figures},
        "load": machine.report(),
    }


def _prompt_args(prompt) -> tuple[str | None, list[int]]:
    """A cell's prompt as (text, ids): text for a model with a tokenizer, else the ids."""
    return (prompt, []) if isinstance(prompt, str) else (None, list(prompt))


def run(
    models=DEFAULT_MODELS,
    sets=None,
    backend: str = "sim",
    prompt_tokens: int = 5,
    decode_steps: int = 4,
    out: str = "bench-results/latency.json",
    data_path: str | None = None,
    resume: bool | str = False,
    connect: dict | None = None,
    quiet: bool = False,
    cold_warm: bool = True,
    conversations: bool = True,
) -> dict:
    """Fill the latency cells (``model/set``, ``model/set/first-token`` and, for a chat model,
    ``model/set/conversation``), write the JSON and the sites plot beside it (``plots/``)."""
    sets = list(sets or default_sets())
    config = {
        "backend": backend,
        "prompt_tokens": prompt_tokens,
        "decode_steps": decode_steps,
        "networks": {k: network.NAMED[k].describe() for k in NETWORKS},
        "default_set": default_approx("sim"),
    }
    store = CellStore(out, config, resume=resume)
    folder = data.optional_data_dir(data_path, "stories260K") if "stories260K" in models else None
    cells = [(name, s) for name in models for s in sets if not (name == "stories260K" and folder is None)]
    for name, approx in tqdm(cells, desc="latency benchmark", unit="cell"):
        source = MODELS[name][0]
        if name == "stories260K":
            source = str(folder / source)
        cell = store.measure(
            f"{name}/{approx}",
            lambda: {
                "model": MODELS[name][1],
                **measure_cell(source, approx, backend, connect, prompt_tokens, decode_steps, quiet=quiet),
            },
        )
        if cold_warm:
            store.measure(
                f"{name}/{approx}/first-token",
                lambda: first_token(source, approx, *_prompt_args(cell["prompt"]), backend, connect, quiet=quiet),
            )
        if conversations and name in CONVERSATION_MODELS:
            store.measure(
                f"{name}/{approx}/conversation",
                lambda: measure_conversation(source, approx, backend, connect, quiet=quiet),
            )
    plot(store.data, os.path.join(os.path.dirname(os.path.abspath(out)), "plots"))
    return store.data


def plot(result: dict, folder: str) -> list[str]:
    """One PNG per model: a decode step's busiest-party send actions and seconds by site, one
    bar group per set (:func:`puma.bench.plots.latency_sites`)."""
    from puma.bench import plots

    made = []
    for name in dict.fromkeys(k.split("/")[0] for k in result.get("cells", {})):
        path = plots.latency_sites(result, name, os.path.join(folder, f"latency_sites_{name}.png"))
        if path:
            made.append(path)
    return made


def add_arguments(p) -> None:
    from puma import options

    p.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS), help="default: %(default)s"
    )
    options.add_sets_arg(p, default_sets())
    options.add_bench_backend_args(p)
    p.add_argument("--prompt-tokens", type=options.positive, default=5, help="prompt tokens (default: %(default)s)")
    p.add_argument(
        "--decode-steps", type=options.positive, default=4, help="decode steps after the prefill (default: %(default)s)"
    )
    p.add_argument(
        "--no-first-token",
        action="store_true",
        help="leave out the cold and warm first token in new processes (default: measure them)",
    )
    p.add_argument(
        "--no-conversation",
        action="store_true",
        help="leave out the two-turn conversation of the chat models (default: measure it)",
    )
    options.add_quiet_arg(p)
    options.add_data_arg(p)


def main(args) -> dict:
    from puma import options

    return run(
        args.models,
        args.sets,
        args.backend,
        args.prompt_tokens,
        args.decode_steps,
        args.out,
        args.data,
        resume=args.resume,
        connect=options.connect(args),
        quiet=args.require_quiet,
        cold_warm=not args.no_first_token,
        conversations=not args.no_conversation,
    )


# -- Markdown --------------------------------------------------------------------------------


def _mb(n: float) -> str:
    mb = n / 1e6
    return f"{mb:.2f}" if abs(mb) >= 1 else f"{mb:.3g}"


def _s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _activation_rows(cells: dict) -> list[str]:
    """The gated activation of each measured model beside the others' (Gemma 3's tanh-GeLU against
    SmolLM2's SiLU): per call and per entry of its [1, I] input, in the cell's own format."""
    rows = [(k, c) for k, c in cells.items() if "activation" in c["sites"]["sites"]]
    if len({k.split("/")[0] for k, _ in rows}) < 2:
        return []
    lines = [
        "",
        "The gated activation act(gate) * up of one decode step, model beside model (each in its own format):",
        "",
        "| model | set | activation | format | entries I | calls per step | busiest party's sends per call | "
        "bytes per entry (all parties) | per step: busiest sends, MB, slowest party s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, cell in rows:
        site, width = cell["sites"]["sites"]["activation"], cell["config"]["intermediate"]
        once, ps = site["once"], site["per_step"]
        act = site["what"].split("(", 1)[0].removeprefix("ops.")
        lines.append(
            f"| {key.split('/')[0]} | {cell['approx']} | {act} | {cell['protocol']} | {width} | {site['count']} | "
            f"{once['max_party_send_actions']} | {once['bytes_sent'] / width:.0f} | "
            f"{ps['max_party_send_actions']}, {_mb(ps['bytes_sent'])}, {_s(ps['max_party_s'])} |"
        )
    lines += [
        "",
        "Bytes per entry: all parties' bytes of one call over its I entries (an FM128 share is twice an FM64 one); "
        "busiest party's sends per call: the rounds of one call, which do not grow with I.",
    ]
    return lines


def markdown(result: dict) -> str:
    cfg = result["config"]
    cells = {k: v for k, v in result["cells"].items() if k.count("/") == 1}
    nets = cfg["networks"]
    lan, wan = (nets[k] for k in NETWORKS)
    lines = [
        f"Private generation, {cfg['prompt_tokens']}-token prompt, prefill + {cfg['decode_steps']} decode steps, "
        f"{cfg['backend']}; LAN = {lan}, WAN = {wan}:",
        "",
        "| model | set | protocol | step | busiest party's sends | all sends | MB | sim s | LAN s | WAN s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, cell in cells.items():
        name = key.split("/")[0]
        label = f"{cell['approx']} ({cell['role']})" if cell.get("role") else cell["approx"]
        star = "*" if cell.get("load", {}).get("contended") else ""
        for step, figures in (("prefill", cell["prefill"]), ("decode step (mean)", cell["decode_mean"])):
            m = figures["modelled_s"]
            lines.append(
                f"| {name} | {label} | {cell['protocol']} | {step} | {figures['max_party_send_actions']:.0f} | "
                f"{figures['send_actions']:.0f} | {_mb(figures['bytes_sent'])} | {_s(figures['wall_s'])}{star} | "
                f"{_s(m[NETWORKS[0]])} | {_s(m[NETWORKS[1]])} |"
            )
    lines += [
        "",
        "Busiest party's sends: the send actions of the party that sent most often in that step (the rounds of "
        "`puma/network.py`); all sends: the send actions of the three parties together; MB: bytes sent by all "
        "parties; sim s: the step's wall seconds with the three parties as threads on this machine; LAN s and "
        "WAN s: those seconds (less weight streaming) + rounds x RTT + (the busiest party's bytes + the "
        "client's I/O) / bandwidth (* = other processes contended the cell's seconds). Each decode step is "
        "one token; every step's figures are in the JSON.",
    ]
    chat = [c for c in cells.values() if c.get("chat_example") and c["source"] == "smollm2"]
    for cell in chat:
        ex, step = cell["chat_example"], cell["decode_mean"]
        lines += [
            "",
            f"Per token of the README's chat example (`{ex['command']}`) with `{cell['approx']}`: each of its "
            f"{ex['decode_steps']} tokens after the first is one decode step as above, "
            f"{step['max_party_send_actions']:.0f} busiest-party sends, {_mb(step['bytes_sent'])} MB, "
            f"{_s(step['wall_s'])} s on sim, {_s(step['modelled_s'][NETWORKS[0]])} s LAN, "
            f"{_s(step['modelled_s'][NETWORKS[1]])} s WAN (measured here against {cell['cache_slots']} cache slots; "
            f"its templated {ex['prompt_tokens']}-token prompt gives {ex['cache_slots']} slots, which changes only "
            "the attention products' and softmax's share).",
        ]
    with_sites = {k: c for k, c in cells.items() if isinstance(c.get("sites"), dict) and "sites" in c["sites"]}
    if with_sites:
        lines += [
            "",
            "One decode step by model site (each site one program at the step's shapes, times its count per step):",
            "",
            "| model | set | site | count | busiest party's sends | MB | slowest party s |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, cell in with_sites.items():
            name, s = key.split("/")[0], cell["sites"]
            for site, v in s["sites"].items():
                ps = v["per_step"]
                lines.append(
                    f"| {name} | {cell['approx']} | {site} | {v['count']} | {ps['max_party_send_actions']} | "
                    f"{_mb(ps['bytes_sent'])} | {_s(ps['max_party_s'])} |"
                )
            for label, v in (
                ("sum of sites", s["sum"]),
                ("measured decode step (mean)", s["measured_step"]),
                ("not attributed (measured - sum)", s["not_attributed"]),
            ):
                lines.append(
                    f"| {name} | {cell['approx']} | **{label}** | | {v['max_party_send_actions']:.0f} | "
                    f"{_mb(v['bytes_sent'])} | {v['max_party_s']:.3f} |"
                )
        lines += [
            "",
            "Busiest party's sends: the send actions of the party that sent most often in a site's own run; slowest "
            "party s: the largest of the three parties' own execution seconds of that run; both times the site's "
            "count per decode step; MB: bytes sent by all parties, times the count. The measured row is the "
            "generation's decode steps; the difference is what the site model does not attribute (residual "
            "additions, the cache update; negative where the sites' own runs cost more, e.g. each run's fixed "
            "overhead in seconds, or where the busiest party of a whole step is not the busiest of every site).",
        ]
    lines += _activation_rows(with_sites)
    lines += [
        "",
        "Top pphlo ops of the last decode step (summed over the parties):",
        "",
        "| model | set | most send actions | most seconds |",
        "|---|---|---|---|",
    ]
    for key, cell in cells.items():
        top = cell["top_ops_last_decode"]
        sends = ", ".join(f"{o['op'].removeprefix('pphlo.')} {o['send_actions']}" for o in top["by_send_actions"])
        secs = ", ".join(f"{o['op'].removeprefix('pphlo.')} {o['seconds']:.3f}" for o in top["by_seconds"])
        lines.append(f"| {key.split('/')[0]} | {cell['approx']} | {sends} | {secs} |")
    lines += [
        "",
        "Send actions and seconds of each op kind over all its calls in the step, all three parties' together.",
    ]
    firsts = {k[: -len("/first-token")]: v for k, v in result["cells"].items() if k.endswith("/first-token")}
    if firsts:
        lines += [
            "",
            "First token in a new process (`puma generate -n 1 --json`, an empty `PUMA_CACHE` for the cold run, "
            "the same folder for the warm one):",
            "",
            "| model | set | cold process s | cold compile s | warm process s | warm compile s | warm / cold |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, f in firsts.items():
            cold, warm = f["cold"], f["warm"]
            star = "*" if f.get("load", {}).get("contended") else ""
            lines.append(
                f"| {key.split('/')[0]} | {key.split('/', 1)[1]} | {cold['process_s']:.1f}{star} | "
                f"{cold['compile_s']:.1f} | "
                f"{warm['process_s']:.1f} | {warm['compile_s']:.1f} | {warm['process_s'] / cold['process_s']:.2f} |"
            )
        lines += [
            "",
            "Process s: wall seconds of the whole process from start to exit (imports, loading, calibration when "
            "not cached, sharing the weights, compiling or reading compiled programs, the prefill that makes the "
            "first token); compile s: the `compile_s` its JSON reports (lowering and compiling, or lowering and "
            "the compile cache lookup); * = other processes contended these seconds.",
        ]
    lines += _conversation_rows(result["cells"])
    return "\n".join(lines)


def _conversation_rows(cells: dict) -> list[str]:
    """The two-turn conversations (``model/set/conversation``): per turn, the message's one step
    and the reply's decode steps; beside the second turn, a client that starts over."""
    talks = {k: v for k, v in cells.items() if k.endswith("/conversation") and "turns" in v}
    if not talks:
        return []
    lines = [
        "",
        "A conversation of two turns in one session (`puma chat`: the chat example's question, then "
        f'"{FOLLOW_UP}"), the cache kept secret at the parties between turns:',
        "",
        "| model | set | turn | message tokens | first token s (compile s) | message step: busiest sends, MB, sim s, "
        "WAN s | reply tokens | decode step (mean): busiest sends, MB, sim s | cache slots |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, talk in talks.items():
        name, approx = key.split("/")[:2]
        star = "*" if talk.get("load", {}).get("contended") else ""
        rows = [
            (str(i), t, t["message_tokens"], t["first_token_s"], t["first_token_compile_s"])
            for i, t in enumerate(talk["turns"], 1)
        ]
        restart = talk["restart"]
        rows.append(
            (
                "2, started over",
                {"message_step": restart["prefill"]},
                restart["prompt_tokens"],
                None,
                restart["compile_s"],
            )
        )
        for label, turn, tokens, first_s, compile_s in rows:
            step, mean = turn["message_step"], turn.get("decode_mean")
            first = f"{first_s:.1f}{star} ({compile_s:.1f})" if first_s is not None else f"- ({compile_s:.1f})"
            decode = (
                f"{mean['max_party_send_actions']:.0f}, {_mb(mean['bytes_sent'])}, {_s(mean['wall_s'])}{star}"
                if mean
                else "-"
            )
            lines.append(
                f"| {name} | {approx} | {label} | {tokens} | {first} | {step['max_party_send_actions']}, "
                f"{_mb(step['bytes_sent'])}, {_s(step['wall_s'])}{star}, {_s(step['modelled_s'][NETWORKS[1]])} | "
                f"{turn.get('reply_tokens', '-')} | {decode} | {turn.get('cache_slots', '-')} |"
            )
    lines += [
        "",
        "Message step: the one secure step that appends a turn's tokens to the cache and reveals the reply's "
        "first token (the first turn's is a prefill); first token s: from the message to its reply's first token, "
        "compilation included (each new shape compiles once per process; the compile cache keeps it for the next); "
        '"2, started over": the prefill of the whole conversation so far as one new prompt, in the same session '
        "(a new process adds the loading and sharing of the first-token table). Figures per step as in the first "
        "table.",
    ]
    return lines
