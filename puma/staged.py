"""Staged execution: a model runs as an embedding stage, one program per block, and a head.

Why: a whole-model program needs every weight at the parties at once (48 bytes per weight
across three ABY3 parties: ~325 GB for LLaMA-7B). Run stage by stage, the parties need only
the current stage's weights, which the model owner shares just before the stage and the
parties drop right after (streamed mode, :meth:`puma.runtime.base.Session.hold_params`), so
memory stays bounded by the largest stage whatever the depth of the model.

What passes between stages: the hidden state ``h`` [B, T, D], a secret state entry of the
run's slot at the parties (never revealed, never sent to the driver); each block's key/value
cache stays in the slot as ``cache_<i>``. Every block of a model has the same shapes, so one
compiled block program serves all blocks with the same norm shifts (usually all of them, at
most a few variants: :mod:`puma.calibration`): a run binds it to layer i's weights
(``bind={"layer": "layers_<i>"}``) and to layer i's cache.

Each stage calls the model's own ``embed`` / ``block`` / ``head`` methods, which its
``__call__`` is built from, so staged and whole-program runs compute the same functions (tested:
same greedy tokens, logits within fixed-point noise).

**A token table read in row blocks.** With streamed weights, a causal LM's token table that
travels in row blocks (:func:`puma.runtime.sharing.row_blocks`: over 1 GiB of shares per party,
such as Gemma 3's 262 144 x 640 at FM128, 5.4 GB per party) is never joined: the owner shares
one block at a time (weight ``<table>#k``, :meth:`puma.runtime.base.Session.table_blocks`) and
the parties drop it after its program. The embedding is the sum over blocks of the one-hot
columns of the block times the block (state ``rows``), then the family's ``embed_rows``; the
tied head runs the family's ``head_input``, one product per block (state ``logits_<k>``), then
their concatenation through ``head_output`` and the reveal. Same function, the same products:
the one-hot product and x @ table^T split along the vocabulary. A party holds one block.
"""

from __future__ import annotations

import itertools
import logging

import jax.numpy as jnp
import numpy as np

from puma import protocols
from puma.models.layers import attend_table
from puma.models.loading import LoadedModel
from puma.program import Program
from puma.protocols import puma as puma_set
from puma.runtime.base import Session

log = logging.getLogger(__name__)

PHASES = ("forward", "logits", "prefill", "decode")
_slots = itertools.count()


def embed_program(model: LoadedModel, ops) -> Program:
    """The embedding stage's program (the family's ``stage_embed``)."""
    module = model.module(ops)

    def fn(params, state, secret, public):
        return {}, {"h": module.apply({"params": params}, secret, public, method="stage_embed")}

    return Program(
        f"{model.family}_stage_embed",
        fn,
        key=(ops.name, model.program_key),
        param_keys=module.stages().embed,
        spec=("stage_embed", {}),
        builtin=protocols.registered(ops),
    )


def block_program(
    model: LoadedModel, ops, layer: int, phase: str, max_len: int = 0, rows: str | None = None
) -> Program:
    """Block ``layer``'s program in a pass of ``phase`` (the family's ``stage_block``), keyed by
    the block's norm shifts and kind (blocks with the same share it); ``rows`` (the last block's,
    see ``ExecutionPlan.last_layer_rows``) keeps only the rows the head reads. A block that keeps
    a cache reads it (decode) and writes it (prefill, decode) as state ``cache``."""
    module = model.module(ops)
    stages = module.stages()
    name = stages.layer_key(layer)
    spec = ("stage_block", {"layer": layer, "phase": phase, "max_len": max_len, "rows": rows})
    key = (ops.name, model.source, model.config, model.shifts.under(name), stages.kind(layer), phase, max_len, rows)

    def fn(params, state, secret, public):
        x, layer_cache = module.apply(
            {"params": {name: params["layer"]}},
            state["h"],
            public,
            state.get("cache"),
            layer,
            phase,
            max_len,
            rows,
            method="stage_block",
        )
        return {}, {"h": x} if layer_cache is None else {"h": x, "cache": layer_cache}

    reads = ("h", "cache") if phase == "decode" else ("h",)
    return Program(
        f"{model.family}_stage_block_{phase}",
        fn,
        key=key,
        param_keys=("layer",),
        state_reads=reads,
        spec=spec,
        builtin=protocols.registered(ops),
    )


def head_program(model: LoadedModel, ops, head: "_Head") -> Program:
    """The head stage's program; ``head`` is a function (module, params, h, secret, public) ->
    reveal dict with its spec."""
    module = model.module(ops)

    def fn(params, state, secret, public):
        return head(module, params, state["h"], secret, public), {}

    return Program(
        f"{model.family}_stage_head",
        fn,
        key=(ops.name, model.program_key, repr(sorted(head.spec.items()))),
        param_keys=module.stages(head.name).head,
        state_reads=("h",),
        spec=("stage_head", head.spec),
        builtin=protocols.registered(ops),
    )


def table_embed_program(model: LoadedModel, ops, first: bool) -> Program:
    """One row block of the token table's embedding: state ``rows`` (plus, after the first
    block, what the earlier blocks gave) + the ids' one-hot columns of the block @ the block.
    The client gives the block's one-hot columns (``client_onehot``: the set's own one-hot
    product) or ids with the block's public first row (PUMA's one-hot by equality with an iota,
    whatever the set's embedding: an id outside the block gives a zero row)."""
    onehot = ops.plan.client_onehot

    def fn(params, state, secret, public):
        x = secret["input_ids"]  # the block's one-hot columns [B, T, n], or ids [B, T]
        table = params["table"]
        rows = ops.embed(x, table) if onehot else puma_set.embed(x - public["row_start"], table)  # [B, T, D]
        return {}, {"rows": rows if first else state["rows"] + rows}

    return Program(
        f"{model.family}_stage_embed_table",
        fn,
        key=(ops.name, model.program_key, first),
        param_keys=("table",),
        state_reads=() if first else ("rows",),
        builtin=protocols.registered(ops),
    )


def embed_rows_program(model: LoadedModel, ops, keys: tuple[str, ...]) -> Program:
    """The embedding from the table's summed rows (state ``rows``): the family's ``embed_rows``,
    with the embedding stage's other weights ``keys`` (GPT-2's positions)."""
    module = model.module(ops)

    def fn(params, state, secret, public):
        return {}, {"h": module.apply({"params": params}, state["rows"], public, method="stage_embed_rows")}

    return Program(
        f"{model.family}_stage_embed_rows",
        fn,
        key=(ops.name, model.program_key),
        param_keys=keys,
        state_reads=("rows",),
        builtin=protocols.registered(ops),
    )


def head_input_program(model: LoadedModel, ops, keys: tuple[str, ...], last_only: bool) -> Program:
    """What the tied head multiplies (state ``x``): the family's ``head_input`` of the last
    position's hidden state (``last_only``) or of every position's."""
    module = model.module(ops)

    def fn(params, state, secret, public):
        h = state["h"][:, -1:] if last_only else state["h"]  # [B, 1 or T, D]
        return {}, {"x": module.apply({"params": params}, h, method="stage_head_input")}

    return Program(
        f"{model.family}_stage_head_input",
        fn,
        key=(ops.name, model.program_key, last_only),
        param_keys=keys,
        state_reads=("h",),
        builtin=protocols.registered(ops),
    )


def table_logits_program(model: LoadedModel, ops) -> Program:
    """One row block's logits x @ block^T (state ``part``, bound per block)."""

    def fn(params, state, secret, public):
        return {}, {"part": attend_table(params["table"], state["x"])}

    return Program(
        f"{model.family}_stage_head_table",
        fn,
        key=(ops.name, model.program_key),
        param_keys=("table",),
        state_reads=("x",),
        builtin=protocols.registered(ops),
    )


def head_output_program(model: LoadedModel, ops, head: "_Head", blocks: int) -> Program:
    """The blocks' logits joined along the vocabulary, the family's ``head_output``, the reveal."""
    module = model.module(ops)
    parts = tuple(f"logits_{k}" for k in range(blocks))

    def fn(params, state, secret, public):
        logits = jnp.concatenate([state[p] for p in parts], axis=-1)  # [B, T, V]
        logits = module.apply({"params": {}}, logits, method="stage_head_output")
        return head.reveal(module.ops, logits, secret), {}

    return Program(
        f"{model.family}_stage_head_output",
        fn,
        key=(ops.name, model.program_key, blocks, repr(sorted(head.spec.items()))),
        param_keys=(),
        state_reads=parts,
        builtin=protocols.registered(ops),
    )


class _Head:
    """A head stage's reveal function with its spec (what it computes, JSON), what it reads
    (``reads``: a causal head's ``last_only``, an encoder head's name), which the model's
    ``block_rows`` turns into the rows its last block computes, and the family head it runs
    (``name``: None for a causal LM's logits)."""

    def __init__(self, fn, spec: dict, reads, name: str | None = None, reveal=None):
        self.fn, self.spec, self.reads, self.name, self.reveal = fn, spec, reads, name, reveal

    def __call__(self, *args):
        return self.fn(*args)


def causal_head(reveal_fn, spec: dict) -> _Head:
    """The head of a causal LM: logits (of the last position with ``spec["last_only"]``) passed
    to ``reveal_fn(ops, logits, secret) -> reveal dict``."""
    last_only = spec["last_only"]

    def fn(module, params, h, secret, public):
        x = h[:, -1:] if last_only else h  # [B, 1, D] or [B, T, D]
        logits = module.apply({"params": params}, x, public, None, method="stage_head")
        return reveal_fn(module.ops, logits, secret)

    return _Head(fn, spec, last_only, reveal=reveal_fn)


def encoder_head(head: str) -> _Head:
    def fn(module, params, h, secret, public):
        return {"output": module.apply({"params": params}, h, public, head, method="stage_head")}

    return _Head(fn, {"head": head}, head, head)


def cache_entry(layer: int) -> str:
    """The slot entry that holds block ``layer``'s key/value cache in a staged run."""
    return f"cache_{layer}"


def run(
    session: Session,
    model: LoadedModel,
    ops,
    phase: str,
    secret: dict,
    public: dict,
    head: _Head,
    slot: str | None = None,
    max_len: int = 0,
) -> dict:
    """One forward pass stage by stage; returns what the head reveals.

    ``phase``: ``forward``/``logits`` (no cache), ``prefill`` (creates each block's cache of
    ``max_len`` slots in ``slot``), ``decode`` (one step against it); encoders use ``forward``.
    ``secret``/``public`` are the whole-program inputs; each stage takes what it needs. Without
    a ``slot`` the hidden state lives in a temporary slot freed at the end.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}")
    module = model.module(ops)
    stages = module.stages(head.name)
    own_slot = slot is None
    slot = slot or f"staged-{next(_slots)}"
    embed_secret = {k: secret[k] for k in ("input_ids", "token_type_ids") if k in secret}
    head_secret = {k: v for k, v in secret.items() if k not in embed_secret}
    n = np.shape(public["position_ids"])[1]
    blocks = session.table_blocks(stages.table) if module.causal else []
    try:
        if blocks:
            _embed_in_blocks(session, model, ops, stages, blocks, embed_secret, public, slot)
        else:
            session.hold_params(list(stages.embed))
            session.run(
                embed_program(model, ops),
                embed_secret,
                {"position_ids": public["position_ids"]},
                state=slot,
            )
            session.release_params(list(stages.embed))
        last_rows = None if phase == "decode" else module.block_rows(head.reads)
        block_public = dict(public)
        if phase != "decode":
            block_public.pop("cache_index", None)
        for i in range(stages.layers):
            key = stages.layer_key(i)
            session.hold_params([key])
            rows = last_rows if i == stages.layers - 1 else None
            program = block_program(model, ops, i, phase, max_len, rows)
            session.run(program, {}, block_public, state=slot, bind={"layer": key, "cache": cache_entry(i)})
            session.release_params([key])
        if blocks and stages.tied and head.reveal is not None:
            out = _head_in_blocks(session, model, ops, stages, blocks, head, head_secret, slot)
        else:
            session.hold_params(list(stages.head))
            head_public = {"attention_mask": public["attention_mask"]}
            out = session.run(head_program(model, ops, head), head_secret, head_public, state=slot)
            session.release_params(list(stages.head))
    finally:
        if own_slot:
            session.free(slot)
    log.debug("staged %s run of %d blocks (%d positions)", phase, stages.layers, n)
    return out


def _table_key(stages, k: int) -> str:
    return f"{stages.table}#{k}"


def _embed_in_blocks(session, model, ops, stages, blocks, secret: dict, public: dict, slot: str) -> None:
    """The embedding stage with the token table in row blocks (see the module doc)."""
    ids = secret["input_ids"]
    onehot = ops.plan.client_onehot
    for k, (start, stop) in enumerate(blocks):
        name = _table_key(stages, k)
        session.hold_params([name])
        block_secret = {"input_ids": ids[..., start:stop] if onehot else ids}  # the client slices its own one-hot
        block_public = {} if onehot else {"row_start": np.int32(start)}
        session.run(
            table_embed_program(model, ops, first=k == 0), block_secret, block_public, state=slot, bind={"table": name}
        )
        session.release_params([name])
    others = _beside_table(stages.embed, stages)
    session.hold_params(list(others))
    session.run(embed_rows_program(model, ops, others), {}, {"position_ids": public["position_ids"]}, state=slot)
    session.release_params(list(others))


def _beside_table(keys: tuple[str, ...], stages) -> tuple[str, ...]:
    """A stage's weight subtrees other than the token table's."""
    return tuple(key for key in keys if key != stages.table.split("/", 1)[0])


def _head_in_blocks(session, model, ops, stages, blocks, head: _Head, secret: dict, slot: str) -> dict:
    """The tied head with the token table in row blocks (see the module doc)."""
    others = _beside_table(stages.head, stages)
    session.hold_params(list(others))
    session.run(head_input_program(model, ops, others, bool(head.reads)), {}, {}, state=slot)
    session.release_params(list(others))
    for k in range(len(blocks)):
        name = _table_key(stages, k)
        session.hold_params([name])
        bind = {"table": name, "part": f"logits_{k}"}
        session.run(table_logits_program(model, ops), {}, {}, state=slot, bind=bind)
        session.release_params([name])
    return session.run(head_output_program(model, ops, head, len(blocks)), secret, {}, state=slot)
