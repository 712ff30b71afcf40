"""Building blocks shared by the model files: parameter holders and attention.

Parameters are named after their Hugging Face counterparts. ``kernel`` is always laid out
``[in, out]`` (so a PyTorch ``nn.Linear.weight``, which is ``[out, in]``, is transposed when it
is loaded); ``weight``/``bias`` of norms and ``embedding`` of lookup tables keep HF's layout.

Non-linear functions and masking come from the :class:`puma.protocols.Ops` set the model was
built with; nothing here calls ``jax.nn`` for them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from puma.protocols import Ops
from puma.protocols.base import prescale

Array = Any
#: A key/value cache: one ``{"k": [B, S, Hkv, Dh], "v": [B, S, Hkv, Dh]}`` dict per layer.
KVCache = tuple

#: The Flax collection calibration sows activation statistics into (:func:`record`).
RANGES = "ranges"


@dataclasses.dataclass(frozen=True)
class NormShifts:
    """Public power-of-two pre-scales of the norms' inputs, by the norm's parameter path
    (``"layers_11/input_layernorm"``): a norm with shift k normalises x 2^-k with eps 4^-k, the
    same function with 4^k times smaller squares (:func:`puma.protocols.base.prescale`).
    :mod:`puma.calibration` chooses them from the model's activation ranges; they are public,
    like the config. Empty: every shift 0."""

    sites: tuple[tuple[str, int], ...] = ()

    def get(self, path: str) -> int:
        return dict(self.sites).get(path, 0)

    def under(self, prefix: str) -> "NormShifts":
        """The shifts inside ``prefix`` (a block's name), by their path relative to it."""
        start = prefix + "/"
        return NormShifts(tuple((p[len(start) :], k) for p, k in self.sites if p.startswith(start)))

    def nonzero(self) -> dict[str, int]:
        return {p: k for p, k in self.sites if k}


def record(module: nn.Module, site: str, value: Array, center: bool = False) -> None:
    """Sow the magnitudes of ``value`` at ``module``'s path + ``site`` while calibrating (the
    :data:`RANGES` collection is mutable); nothing otherwise, so secure programs carry no op.

    Statistics: the largest |value| and the smallest and largest mean square of a row (the last
    axis; with ``center`` of the row minus its mean, as LayerNorm squares it), which
    :mod:`puma.calibration` checks against the fixed-point bounds.
    """
    if module.is_mutable_collection(RANGES):
        rows = value.reshape(-1, value.shape[-1])  # [R, n]
        if center:
            rows = rows - jnp.mean(rows, axis=-1, keepdims=True)
        squares = jnp.mean(rows * rows, axis=-1)  # [R]
        stats = jnp.stack([jnp.max(jnp.abs(rows)), jnp.min(squares), jnp.max(squares), rows.shape[-1]])
        module.sow(RANGES, site, stats)


@dataclasses.dataclass(frozen=True)
class Stages:
    """How a model runs as stages (see :mod:`puma.staged`): the top-level weight subtrees of
    the embedding stage, the name pattern of block i's subtree (``"layers_{}"``) and the number
    of blocks, and the subtrees of the head stage. A model's ``stage_block`` reads block i's
    weights under block i's name; programs are keyed by the block's norm shifts and its kind,
    so one compiled block serves every layer with the same shifts and kind. ``kinds`` names each
    block's kind where blocks compute different things (Gemma's sliding and global layers);
    empty, every block is alike.

    ``table``: the flat name of the token table ``[V, D]`` a causal LM's embedding stage reads
    (and, ``tied``, its head), which a streamed run may read in row blocks
    (:func:`puma.staged.run`): the embedding is then the sum of the blocks' one-hot products
    and the logits the concatenation of theirs, so no party holds the whole table."""

    embed: tuple[str, ...]
    layer: str
    layers: int
    head: tuple[str, ...]
    kinds: tuple[str, ...] = ()
    table: str = ""
    tied: bool = False

    def layer_key(self, i: int) -> str:
        return self.layer.format(i)

    def kind(self, i: int) -> str:
        """What block i computes beyond its weights and shifts ("" when every block is alike)."""
        return self.kinds[i] if self.kinds else ""

    def keys(self) -> list[str]:
        """Every weight subtree the stages use, in stage order (each once)."""
        ordered = [*self.embed, *(self.layer_key(i) for i in range(self.layers)), *self.head]
        return list(dict.fromkeys(ordered))


class ModelConfig(Protocol):
    """The contract of a family's config: a frozen dataclass with Hugging Face field names and
    these family-independent views, which puma's tasks, runtime and benchmarks read."""

    model_type: ClassVar[str]
    vocab_size: int

    @property
    def max_positions(self) -> int: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @classmethod
    def from_hf(cls, hf_config) -> "ModelConfig": ...

    def to_hf(self): ...


class FamilyModule(Protocol):
    """The contract of a family's Flax module: the programs puma's tasks and stages call, by
    name, with these signatures (``secret`` and ``public`` are the program's input dicts), so no
    caller branches on the family. Causal LMs get them from :class:`CausalLM`.

    Whole-model calls: a causal LM's ``forward(input_ids, attention_mask, position_ids,
    last_only)``, ``prefill(input_ids, attention_mask, position_ids, max_len)`` and
    ``decode(input_ids, attention_mask, position_ids, cache, cache_index)`` -> (logits, cache);
    an encoder's ``encode(input_ids, attention_mask, token_type_ids, position_ids, head)``.

    Stages (:mod:`puma.staged`): ``stage_embed(secret, public) -> h``, ``stage_block(h,
    public, layer_cache, layer, phase, max_len, rows) -> (h, layer_cache or None)`` and
    ``stage_head(h, public, head) -> output``; ``stages(head)`` names each stage's weights and
    ``block_rows(reads)`` the rows the last block computes.
    """

    config: ModelConfig
    causal: ClassVar[bool]

    def stage_embed(self, secret: dict, public: dict) -> Array: ...

    def stage_block(
        self, h: Array, public: dict, layer_cache, layer: int, phase: str, max_len: int, rows: str | None
    ) -> tuple[Array, dict | None]: ...

    def stage_head(self, h: Array, public: dict, head: str | None) -> Array: ...

    def block_rows(self, reads) -> str | None: ...

    def stages(self, head: str | None = None) -> Stages: ...


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family as the registry (:data:`puma.models.loading.FAMILIES`) knows it."""

    name: str
    config_cls: type
    module_cls: type
    mapping: list  # HF tensor name -> (Flax path, transpose); "{i}" is the layer index
    presets: dict
    prefix: str  # prefix of the body's tensors in task checkpoints ("bert.", "transformer.", "model.")
    init_kwargs: Callable[[Any], dict] = lambda config: {}  # extra arguments of a shape-only init
    gguf_names: dict | None = None  # GGUF tensor name -> HF name ("{i}": layer); None: no GGUF architecture
    gguf_permuted_rotary: bool = False  # llama.cpp stored the q/k rows permuted (its "llama" architecture)
    gguf_norm_offset: float = 0.0  # llama.cpp stored the norms' weights plus this (Gemma's 1 + weight)
    joins: tuple = ()  # (module, its projections, joined name): stored side by side for fused sets

    @property
    def causal(self) -> bool:
        return self.module_cls.causal


class ConfigFields:
    """The family-independent views of :class:`ModelConfig`, written once: each family's
    config names its Hugging Face fields in ``FIELDS`` (``max_positions``, ``num_layers``,
    ``hidden``, ``heads``, ``activation`` and optionally ``kv_heads``) and its transformers class
    in ``HF_CLASS``."""

    FIELDS: ClassVar[dict[str, str]]
    HF_CLASS: ClassVar[str]

    @property
    def max_positions(self) -> int:
        return getattr(self, self.FIELDS["max_positions"])

    @property
    def num_layers(self) -> int:
        return getattr(self, self.FIELDS["num_layers"])

    @property
    def num_heads(self) -> int:
        return getattr(self, self.FIELDS["heads"])

    @property
    def num_kv_heads(self) -> int:
        return getattr(self, self.FIELDS.get("kv_heads", self.FIELDS["heads"]))

    @property
    def head_dim(self) -> int:
        return getattr(self, self.FIELDS["hidden"]) // self.num_heads

    @property
    def activation(self) -> str:
        """The feed-forward activation's Hugging Face name (``gelu``, ``gelu_new``, ``silu``)."""
        return getattr(self, self.FIELDS["activation"])

    @classmethod
    def from_hf(cls, hf_config):
        """Build from a transformers config (or anything with the same attributes)."""
        return cls(**hf_fields(cls, hf_config))

    def to_hf(self):
        """The equivalent transformers config (for references and saving)."""
        import transformers

        return getattr(transformers, self.HF_CLASS)(**dataclasses.asdict(self))


class CausalLM(nn.Module):
    """The causal-LM call convention, written once for every decoder family.

    A subclass sets up ``self.blocks`` (its decoder blocks, each called ``(x, *extra, mask,
    layer_cache, cache_index) -> (x, layer_cache)``), its token table ``embed_tokens``, final
    ``norm`` and untied ``lm_head`` (or overrides ``embed`` and ``head``), defines ``stages()``,
    what differs around the table (``embed_rows``, ``head_output``) and, when its blocks need
    per-call tables (LLaMA's rotary cos/sin), ``block_inputs(position_ids)``.

    Call with ``input_ids`` [B, T] and optionally ``attention_mask`` (1 = real token; left
    padding for batches), ``position_ids`` [B, T], and a key/value ``cache`` with
    ``cache_index`` (the slot of the first new token). Returns ``(logits, cache)``: logits
    [B, T, V] (or [B, 1, V] with ``last_only``) and the updated cache (``None`` without one).
    Without a cache ``attention_mask`` covers the T tokens; with one it covers all S slots.
    """

    causal: ClassVar[bool] = True

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache: KVCache | None = None,
        cache_index=0,
        last_only: bool = False,
    ):
        position_ids, mask = causal_inputs(
            input_ids, attention_mask, position_ids, cache, cache_index
        )  # mask [B,1,T,S]
        extra = self.block_inputs(position_ids)
        x = self.embed(input_ids, position_ids)  # [B, T, D]
        new_cache = []
        for i, block in enumerate(self.blocks):
            rows = self.block_rows(last_only) if i == len(self.blocks) - 1 else None
            x, layer_cache = block(x, *extra, mask, None if cache is None else cache[i], cache_index, rows)
            new_cache.append(layer_cache)
        if last_only:
            x = x[:, -1:]  # [B, 1, D]
        return self.head(x), (None if cache is None else tuple(new_cache))

    # -- the programs tasks call (FamilyModule) --------------------------------------------------

    def forward(self, input_ids, attention_mask, position_ids, last_only: bool = False):
        """Logits of a window without a cache: ([B, T or 1, V], None)."""
        return self(input_ids, attention_mask, position_ids, last_only=last_only)

    def prefill(self, input_ids, attention_mask, position_ids, max_len: int):
        """The prompt once, the last logits and a new cache of ``max_len`` slots."""
        cache = self.init_cache(input_ids.shape[0], max_len)
        return self(input_ids, attention_mask, position_ids, cache, 0, last_only=True)

    def decode(self, input_ids, attention_mask, position_ids, cache, cache_index):
        """New tokens against ``cache`` at slot ``cache_index``: the last logits and the cache."""
        return self(input_ids, attention_mask, position_ids, cache, cache_index, last_only=True)

    def stage_embed(self, secret: dict, public: dict):
        return self.embed(secret["input_ids"], public["position_ids"])

    def stage_block(self, h, public: dict, layer_cache, layer: int, phase: str, max_len: int, rows: str | None):
        """Block ``layer`` in a pass of ``phase``: ``prefill`` starts its cache of ``max_len``
        slots, ``decode`` continues ``layer_cache`` at ``public["cache_index"]``, ``forward`` and
        ``logits`` keep none."""
        if phase == "prefill":
            cfg = self.config
            layer_cache = init_cache(1, h.shape[0], max_len, cfg.num_kv_heads, cfg.head_dim)[0]
            return self.block(h, public["attention_mask"], public["position_ids"], layer_cache, 0, rows, layer)
        if phase == "decode":
            return self.block(
                h, public["attention_mask"], public["position_ids"], layer_cache, public["cache_index"], None, layer
            )
        x, _ = self.block(h, public["attention_mask"], public["position_ids"], None, 0, rows, layer)
        return x, None

    def stage_head(self, h, public: dict, head: str | None = None):
        """Logits [B, T, V] of hidden states [B, T, D]."""
        return self.head(h)

    # -- the embedding and the LM head, around the token table (row blocks of it: puma.staged) --

    def embed(self, input_ids, position_ids=None):
        """Token embeddings [B, T, D]: :meth:`embed_rows` of the rows of ``embed_tokens``."""
        return self.embed_rows(self.embed_tokens(input_ids, self.ops), position_ids)

    def head(self, x):
        """The final norm, the LM head (tied to ``embed_tokens`` or ``lm_head``) and
        :meth:`head_output`: [B, T, D] -> logits [B, T, V]."""
        x = self.head_input(x)
        logits = self.embed_tokens.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)
        return self.head_output(logits)

    def embed_rows(self, rows, position_ids):
        """The embedding from the token table's rows for the ids, ``rows`` [B, T, D] (linear in
        the table, so a sum over row blocks gives the same): the rows as they are by default."""
        return rows

    def head_input(self, x):
        """What the LM head multiplies: the final norm of ``x`` [B, T, D]."""
        return self.norm(x)

    def head_output(self, logits):
        """The logits from the LM head's products [B, T, V] (elementwise): as they are by default."""
        return logits

    def stage_embed_rows(self, rows, public: dict):
        return self.embed_rows(rows, public["position_ids"])

    def stage_head_input(self, h):
        return self.head_input(h)

    def stage_head_output(self, logits):
        return self.head_output(logits)

    def block_inputs(self, position_ids) -> tuple:
        """Arrays every block takes before the mask (none by default)."""
        return ()

    def block_rows(self, last_only: bool) -> str | None:
        """The rows the last block must compute (:func:`row_slice`): only the last position when
        only the last logits are wanted and the set saves on the last layer, else all."""
        return "last" if last_only and self.ops.plan.last_layer_rows else None

    def block(
        self,
        x,
        attention_mask,
        position_ids,
        layer_cache=None,
        cache_index=0,
        rows: str | None = None,
        layer: int = 0,
    ):
        """Block ``layer`` on x [B, T, D] (its weights under its own name); the mask (and any
        block inputs) are rebuilt from the public inputs. ``rows`` (see :func:`row_slice`) keeps
        only those rows of the output. Returns (x, layer_cache)."""
        cache = None if layer_cache is None else (layer_cache,)
        position_ids, mask = causal_inputs(x, attention_mask, position_ids, cache, cache_index)  # mask [B,1,T,S]
        return self.blocks[layer](x, *self.block_inputs(position_ids), mask, layer_cache, cache_index, rows)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        cfg = self.config
        return init_cache(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)


def normal_init(std: float = 0.02):
    return nn.initializers.normal(stddev=std)


class Linear(nn.Module):
    """y = x @ kernel + bias with ``kernel`` of shape ``[in, out]``."""

    features: int
    use_bias: bool = True
    std: float = 0.02

    @nn.compact
    def weights(self, in_features: int) -> tuple[Array, Array | None]:
        """``kernel`` [in, out] and ``bias`` [out] (None without one)."""
        kernel = self.param("kernel", normal_init(self.std), (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
        return kernel, bias

    def __call__(self, x: Array) -> Array:
        kernel, bias = self.weights(x.shape[-1])
        y = jnp.einsum("...i,io->...o", x, kernel)  # [..., in] x [in, out] -> [..., out]
        record(self, "output", y)
        return y if bias is None else y + bias


def project(x: Array, linears: list[Linear], fused: bool, joined: Linear | None = None) -> list[Array]:
    """Each of ``linears`` applied to x. ``fused`` (:attr:`ExecutionPlan.fused_projections`)
    multiplies once by their kernels side by side: the same outputs, one matrix product (one
    round under MPC) instead of one per projection. The side-by-side kernel is ``joined`` when the
    weights were loaded so (:func:`puma.models.loading.join_projections`: the owner joins them
    before sharing, once), else it is made in the program by joining the kernels, which is local
    on shares but copies them at every run."""
    if not fused:
        return [linear(x) for linear in linears]
    if joined is not None:
        y, biases = joined(x), [None] * len(linears)  # [..., sum of outs], biases included
    else:
        parts = [linear.weights(x.shape[-1]) for linear in linears]
        kernel = jnp.concatenate([k for k, _ in parts], axis=1)  # [in, sum of outs]
        y = jnp.einsum("...i,io->...o", x, kernel)  # [..., in] x [in, sum of outs] -> [..., sum of outs]
        biases = [b for _, b in parts]
    outputs = jnp.split(y, np.cumsum([linear.features for linear in linears])[:-1].tolist(), axis=-1)
    return [out if b is None else out + b for out, b in zip(outputs, biases)]


def joined_linear(module: nn.Module, name: str, linears: list[Linear]) -> Linear | None:
    """The Linear ``name`` of ``module`` holding ``linears``' kernels side by side when the
    loaded weights have it (:func:`puma.models.loading.join_projections`), else None."""
    if name not in module.variables.get("params", {}):
        return None
    return Linear(sum(linear.features for linear in linears), linears[0].use_bias, name=name)


#: The most rows x table entries one lookup takes at once. Beyond it, client-made one-hot rows
#: are looked up in slices of the vocabulary (each slice's one-hot columns times the table's
#: rows of that slice, summed: every table row is read once), secret ids in groups of positions
#: (one equality with every row per group). cheetah's homomorphic product of a one-hot by the
#: table holds about 0.76 GB per row of GPT-2's 50 257 entries on top of 3.1 GB (measured: 4.6 GB
#: at 2 rows, 9.2 GB at 8), so GPT-2's 32-token prompt at once needed more than this machine's
#: 24 GiB; each slice or group costs one more round.
LOOKUP_ELEMENTS = 1 << 19


class Embedding(nn.Module):
    """A lookup table ``embedding`` of shape ``[num, dim]``."""

    num: int
    dim: int
    std: float = 0.02

    def setup(self):
        self.embedding = self.param("embedding", normal_init(self.std), (self.num, self.dim), jnp.float32)

    def __call__(self, ids: Array, ops: Ops) -> Array:
        """Rows for (possibly secret) ids [B, T] (or client-made one-hot rows [B, T, V]) through
        the ops set, :data:`LOOKUP_ELEMENTS` at a time: -> [B, T, dim]."""
        rows = ids.shape[0] * ids.shape[1]
        if rows * self.num <= LOOKUP_ELEMENTS:
            return ops.embed(ids, self.embedding)
        if ids.ndim == 3:  # one-hot [B, T, V]: slices of the vocabulary, each table row read once
            width = max(1, LOOKUP_ELEMENTS // rows)
            parts = [
                ops.embed(ids[..., v : v + width], self.embedding[v : v + width]) for v in range(0, self.num, width)
            ]
            return functools.reduce(jnp.add, parts)  # [B, T, dim]
        group = max(1, LOOKUP_ELEMENTS // (ids.shape[0] * self.num))
        parts = [ops.embed(ids[:, t : t + group], self.embedding) for t in range(0, ids.shape[1], group)]
        return jnp.concatenate(parts, axis=1)  # [B, T, dim]

    def take_public(self, ids: Array) -> Array:
        """Rows for public ids (positions): a plain gather, [...] -> [..., dim]."""
        return jnp.take(self.embedding, ids, axis=0)

    def attend(self, x: Array) -> Array:
        """Tied output projection: [..., dim] -> [..., num] (:func:`attend_table`)."""
        logits = attend_table(self.embedding, x)
        record(self, "logits", logits)
        return logits


def attend_table(table: Array, x: Array) -> Array:
    """x @ table^T for a table [num, dim] and x [..., dim] -> [..., num].

    Written as table @ rows^T, with the table as the left operand in its stored layout: the
    same products as x @ table^T, but SPU runs x @ table^T by first transposing the shares of
    the [num, dim] table (SmolLM2's 49152 x 576: 2.8 s per party per token in ``sim`` against
    0.11 s this way)."""
    rows = x.reshape(-1, x.shape[-1])  # [R, dim]
    return (table @ rows.T).T.reshape(x.shape[:-1] + (table.shape[0],))  # [num, dim] @ [dim, R] -> [R, num]


class LayerNorm(nn.Module):
    """LayerNorm parameters (``weight``, ``bias``) applied through ``ops.layer_norm`` to the
    input pre-scaled by 2^-``shift`` (:func:`~puma.protocols.base.prescale`)."""

    eps: float
    ops: Ops
    shift: int = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
        record(self, "layer_norm_input", x, center=True)
        x, eps = prescale(x, self.eps, self.shift)
        y = self.ops.layer_norm(x, weight, bias, eps)
        record(self, "output", y)
        return y


class RMSNorm(nn.Module):
    """RMSNorm parameter (``weight``) applied through ``ops.rms_norm`` to the input pre-scaled
    by 2^-``shift`` (:func:`~puma.protocols.base.prescale`). The scale is ``offset + weight``
    (Gemma stores its norms' weights as offsets from 1: ``offset=1``)."""

    eps: float
    ops: Ops
    shift: int = 0
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        if self.offset:
            weight = weight + self.offset
        record(self, "rms_norm_input", x)
        x, eps = prescale(x, self.eps, self.shift)
        y = self.ops.rms_norm(x, weight, eps)
        record(self, "output", y)
        return y


def init_cache(num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int) -> KVCache:
    """An empty key/value cache with room for ``max_len`` positions."""
    shape = (batch, max_len, num_kv_heads, head_dim)
    return tuple({"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)} for _ in range(num_layers))


def causal_inputs(
    input_ids: Array,
    attention_mask: Array | None,
    position_ids: Array | None,
    cache: KVCache | None,
    cache_index: Array,
) -> tuple[Array, Array]:
    """Position ids [B, T] and the causal attention mask [B, 1, T, S] of a causal LM call.

    ``input_ids`` is [B, T] (ids) or [B, T, V] (client one-hot rows). Without a cache the mask
    covers the T new tokens; with one it covers all S cache slots (``attention_mask`` [B, S]).
    """
    batch, length = input_ids.shape[:2]
    if attention_mask is not None:
        key_valid = attention_mask
    else:
        slots = length if cache is None else cache[0]["k"].shape[1]
        key_valid = jnp.ones((batch, slots), jnp.int32)
    if position_ids is None:
        position_ids = default_positions(key_valid, cache_index, length)
    return position_ids, causal_mask(query_slots(batch, length, cache_index), key_valid)


def hf_fields(config_cls, hf_config) -> dict:
    """The fields of a frozen puma config that a Hugging Face config has, by name."""
    return {f.name: getattr(hf_config, f.name) for f in dataclasses.fields(config_cls) if hasattr(hf_config, f.name)}


def query_slots(batch: int, length: int, cache_index: Array) -> Array:
    """Absolute cache slots of the ``length`` new tokens: [B, T]."""
    return jnp.broadcast_to(cache_index + jnp.arange(length, dtype=jnp.int32), (batch, length))


def causal_mask(slots: Array, key_valid: Array) -> Array:
    """Which keys each query may see: [B, 1, T, S] booleans.

    ``slots`` [B, T] are the queries' cache slots; ``key_valid`` [B, S] marks real (non-padding)
    keys. A query sees valid keys at or before its own slot, and always itself, so no row is
    empty (padding queries attend to themselves only; their outputs are never used).
    """
    key_slots = jnp.arange(key_valid.shape[-1], dtype=jnp.int32)
    earlier = key_slots[None, None, :] <= slots[:, :, None]  # [B, T, S]
    allowed = (earlier & key_valid[:, None, :].astype(bool)) | (key_slots[None, None, :] == slots[:, :, None])
    return allowed[:, None]


def padding_mask(key_valid: Array, length: int) -> Array:
    """Bidirectional mask: every query sees every valid key, [B, 1, T, S]."""
    valid = key_valid.astype(bool)[:, None, None, :]
    return jnp.broadcast_to(valid, (valid.shape[0], 1, length, valid.shape[-1]))


def update_cache(layer_cache: dict, k: Array, v: Array, cache_index: Array) -> dict:
    """Write new keys/values [B, T, Hkv, Dh] at slots cache_index..cache_index+T-1."""
    start = (0, cache_index, 0, 0)
    return {
        "k": jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start),
        "v": jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start),
    }


def row_slice(rows: str | None) -> slice:
    """The rows a block computes in full: ``None`` all, ``"last"`` the last position (a causal
    LM whose head reads only the last logits), ``"first"`` the [CLS] row (pooled and classifier
    heads). Keys and values always come from every row."""
    return {None: slice(None), "last": slice(-1, None), "first": slice(0, 1)}[rows]


#: Fused-head attention multiplies H times more terms locally (the spread operands'
#: zeros); above this many multiply-adds per product the heads are multiplied one by one.
FUSED_HEADS_MAX_MACS = 2**30


def attend(
    q: Array, k: Array, v: Array, mask: Array, ops: Ops, module: nn.Module | None = None, scaled: bool = False
) -> Array:
    """Scaled dot-product attention with grouped key/value heads.

    q: [B, T, H, Dh] (already times 1/sqrt(Dh) when ``scaled``); k, v: [B, S, Hkv, Dh] with H a
    multiple of Hkv; mask: [B, 1, T, S].
    Returns [B, T, H * Dh]. With ``ops.plan.fused_heads`` the heads go through one product each way
    (:func:`_attend_fused`), which SPU runs in one round instead of one per head. The scores
    and each row's maximum over the keys it sees are recorded at ``module``'s path while
    calibrating (:func:`record`).
    """
    batch, length, heads, head_dim = q.shape
    kv_heads, keys = k.shape[2], k.shape[1]
    group = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, group, head_dim)  # [B, T, Hkv, G, Dh]
    if not scaled:
        q = q * (1.0 / math.sqrt(head_dim))
    if module is not None and module.is_mutable_collection(RANGES):
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k)  # [B, Hkv, G, T, S]
        record(module, "scores", scores)
        row_max = jnp.max(jnp.where(mask[:, :, None], scores, -jnp.inf), axis=-1)  # [B, Hkv, G, T]
        record(module, "score_row_max", row_max.reshape(-1, 1))  # one statistic per row: its max
    if ops.plan.fused_heads and length * keys * heads * heads * head_dim <= FUSED_HEADS_MAX_MACS:
        return _attend_fused(q, k, v, mask, ops)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k)  # [B, Hkv, G, T, S]
    probs = ops.softmax(scores, mask[:, :, None])  # mask [B, 1, 1, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # [B, T, Hkv, G, Dh]
    return out.reshape(batch, length, heads * head_dim)


def _spread(x: Array) -> Array:
    """[B, R, H, C] -> [B, R * H, H * C]: row (r, h) holds x[:, r, h] in column block h, zeros
    elsewhere. The zeros are public and the placement is a select on a public pattern: no
    communication, and it touches only the query (or probability) side of a product."""
    batch, rows, heads, cols = x.shape
    eye = np.eye(heads, dtype=bool)[None, None, :, :, None]  # [1, 1, H, H, 1]
    placed = jnp.where(eye, x[:, :, :, None, :], 0.0)  # [B, R, H, H, C]
    return placed.reshape(batch, rows * heads, heads * cols)


def _attend_fused(q: Array, k: Array, v: Array, mask: Array, ops: Ops) -> Array:
    """All heads in one product each way: spread(Q) [T*H, H*Dh] @ K stacked per head [H*Dh, S]
    and spread(P) [T*H, H*S] @ V stacked per head [H*S, Dh].

    Row (t, h) of the spread queries holds query t's head h in column block h, and row block h
    of the stacked keys is head h's key head (its group's), so the product's outputs are exactly
    the H per-head score matrices (the same outputs, so the same bytes under ABY3, where a
    product costs per output); the values product gives every head's output the same way.
    The zeros sit on the query and probability side, T*H*H*(Dh + S) entries, not on the keys'
    and values' H*Dh*H*S (a decode step of SmolLM2: 6 480 entries, not 165 888).
    """
    batch, length, kv_heads, group, head_dim = q.shape
    heads, keys = kv_heads * group, k.shape[1]
    queries = _spread(q.reshape(batch, length, heads, head_dim))  # [B, T*H, H*Dh]
    keys_t = jnp.repeat(jnp.transpose(k, (0, 2, 3, 1)), group, axis=1)  # [B, Hkv, Dh, S] -> [B, H, Dh, S]
    scores = jnp.einsum("brn,bns->brs", queries, keys_t.reshape(batch, heads * head_dim, keys))  # [B, T*H, S]
    scores = jnp.transpose(scores.reshape(batch, length, kv_heads, group, keys), (0, 2, 3, 1, 4))  # [B, Hkv, G, T, S]
    probs = ops.softmax(scores, mask[:, :, None])  # mask [B, 1, 1, T, S]
    probs = _spread(jnp.transpose(probs, (0, 3, 1, 2, 4)).reshape(batch, length, heads, keys))  # [B, T*H, H*S]
    values = jnp.repeat(jnp.transpose(v, (0, 2, 1, 3)), group, axis=1)  # [B, Hkv, S, Dh] -> [B, H, S, Dh]
    out = jnp.einsum("brm,bmd->brd", probs, values.reshape(batch, heads * keys, head_dim))  # [B, T*H, Dh]
    return out.reshape(batch, length, heads * head_dim)


def default_positions(key_valid: Array, cache_index: Array, length: int) -> Array:
    """Position ids [B, T] of the new tokens, counted over real tokens (so left padding works).

    ``key_valid`` [B, S] marks real tokens over all slots; the new tokens sit at slots
    ``cache_index .. cache_index + length - 1``.
    """
    positions = jnp.maximum(jnp.cumsum(jnp.asarray(key_valid, jnp.int32), axis=-1) - 1, 0)  # [B, S]
    return jax.lax.dynamic_slice_in_dim(positions, cache_index, length, axis=1)
