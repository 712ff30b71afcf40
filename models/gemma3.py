"""Gemma 3 (text) in Flax: LLaMA's decoder with Gemma's changes.

Matches ``transformers.Gemma3ForCausalLM`` on the same weights. What differs from LLaMA
(``llama.py``, whose feed-forward and rotation this file reuses):

- every RMSNorm scales by (1 + weight), and each block normalises four times: before and after
  the attention (``input_layernorm``, ``post_attention_layernorm``) and before and after the
  feed-forward (``pre_feedforward_layernorm``, ``post_feedforward_layernorm``);
- queries and keys are RMS-normalised per head (``q_norm``, ``k_norm``) before the rotation;
- the scores are scaled by ``query_pre_attn_scalar`` ** -0.5 (transformers' Gemma 3 ignores
  ``attn_logit_softcapping``, None in every Gemma 3; so does puma);
- the token embedding is multiplied by sqrt(hidden_size) (in float32, the model's dtype here);
- sliding-window layers (``layer_types``) see only the last ``sliding_window`` tokens and rotate
  with their own base (``rope_local_base_freq``); the global layers use ``rope_theta`` and
  ``rope_scaling`` (none or linear);
- the feed-forward is gated tanh-GeLU (``hidden_activation = gelu_pytorch_tanh``), taken from the
  ops set like every non-linearity; the LM head is the tied embedding, optionally soft-capped.

A sliding layer's key/value cache has the same slots as a global layer's; the window is applied
by the (public) mask, so the cache keeps every key and the layer attends only to its window.
That is exact, and costs under MPC what a global layer costs: generation in puma stays far
below Gemma's 512-token window, where a ring buffer would save nothing.

The rotary angles of a position p = K a + b (public) come from two host tables of size about
sqrt(max_position_embeddings) by the angle-addition formulas (public products under MPC), not
from [max_position_embeddings, head_dim] tables: Gemma's 32 768 positions and 256-wide heads
would put 32 MB tables (cos and sin, for each base) inside every compiled program.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from puma.models import llama
from puma.models.layers import (
    CausalLM,
    Embedding,
    Linear,
    NormShifts,
    RMSNorm,
    Stages,
    hf_fields,
    record,
    row_slice,
)
from puma.protocols import Ops
from puma.protocols.exact import OPS as EXACT

Array = Any

SLIDING = "sliding_attention"
GLOBAL = "full_attention"


def default_layer_types(layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Every ``pattern``-th layer global, the others sliding (transformers' and llama.cpp's
    default for Gemma 3)."""
    return tuple(SLIDING if (i + 1) % pattern else GLOBAL for i in range(layers))


@dataclasses.dataclass(frozen=True)
class Gemma3Config(llama.RotaryDecoderConfig):
    """Gemma 3 text hyper-parameters under their Hugging Face names (``Gemma3TextConfig``).

    ``rope_scaling`` is HF's dict as sorted (key, value) pairs, so the config stays hashable;
    ``layer_types`` left empty means the default pattern (5 sliding layers, then a global one).
    """

    model_type: ClassVar[str] = "gemma3_text"
    HF_CLASS: ClassVar[str] = "Gemma3TextConfig"
    FIELDS: ClassVar[dict] = {
        "max_positions": "max_position_embeddings",
        "num_layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "activation": "hidden_activation",
    }
    mlp_bias: ClassVar[bool] = False  # what llama.LlamaMLP reads
    qk_norm: ClassVar[bool] = True  # what llama.LlamaAttention reads
    norm_offset: ClassVar[float] = 1.0

    vocab_size: int = 262144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: tuple | None = None
    sliding_window: int = 512
    layer_types: tuple[str, ...] = ()
    query_pre_attn_scalar: float = 256
    final_logit_softcapping: float | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_hidden_layers))
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {SLIDING, GLOBAL}:
            raise ValueError(f"layer_types must give {SLIDING!r} or {GLOBAL!r} for each of the layers")
        kind = dict(self.rope_scaling or ()).get("rope_type", dict(self.rope_scaling or ()).get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"rope_scaling {dict(self.rope_scaling)!r} is not supported (none or linear)")

    @property
    def hidden_act(self) -> str:
        """The activation under LLaMA's field name (what llama.LlamaMLP reads)."""
        return self.hidden_activation

    @property
    def query_scale(self) -> float:
        """Gemma scales the scores by 1/sqrt(query_pre_attn_scalar), attend by 1/sqrt(Dh)."""
        return math.sqrt(self.head_dim / self.query_pre_attn_scalar)

    @property
    def rope_factor(self) -> float:
        """The linear rope scaling's factor of the global layers (1 without scaling)."""
        return float(dict(self.rope_scaling or ()).get("factor", 1.0))

    @classmethod
    def from_hf(cls, hf_config) -> "Gemma3Config":
        """Build from a ``transformers.Gemma3TextConfig``; bidirectional attention is refused."""
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention is not supported (causal Gemma 3 only)")
        kwargs = hf_fields(cls, hf_config)
        kwargs["layer_types"] = tuple(kwargs.get("layer_types") or ())
        kwargs["rope_scaling"] = tuple(sorted(kwargs["rope_scaling"].items())) if kwargs.get("rope_scaling") else None
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            kwargs["eos_token_id"] = eos[0]
        return cls(**kwargs)

    def to_hf(self):
        import transformers

        kwargs = dataclasses.asdict(self)
        kwargs["layer_types"] = list(self.layer_types)
        kwargs["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return transformers.Gemma3TextConfig(**kwargs)

    @classmethod
    def gguf_fields(cls, meta, fields: dict) -> dict:
        """What llama.cpp's ``gemma3`` metadata adds to the shared fields (``meta(key, default)``
        reads ``gemma3.<key>``). llama.cpp fixes what the file does not say: every 6th layer
        global, a local base of 10 000 and the scores scaled by 1/sqrt(head_dim) (by
        1/sqrt(hidden/heads) for the 62-layer 27B)."""
        layers = fields["num_hidden_layers"]
        pattern = meta("attention.sliding_window_pattern")
        if isinstance(pattern, list):  # one flag per layer: true for a sliding one
            layer_types = tuple(SLIDING if p else GLOBAL for p in pattern)
        else:
            layer_types = default_layer_types(layers, int(pattern or 6))
        scaling = None
        if meta("rope.scaling.type") == "linear":
            scaling = (("factor", float(meta("rope.scaling.factor"))), ("rope_type", "linear"))
        scalar = fields["hidden_size"] // fields["num_attention_heads"] if layers == 62 else fields["head_dim"]
        softcap = meta("final_logit_softcapping")
        return {
            "sliding_window": int(meta("attention.sliding_window", cls.sliding_window)),
            "layer_types": layer_types,
            "rope_local_base_freq": float(meta("rope.freq_base_swa", cls.rope_local_base_freq)),
            "rope_scaling": scaling,
            "query_pre_attn_scalar": scalar,
            "final_logit_softcapping": None if softcap is None else float(softcap),
        }


PRESETS = {
    "gemma3-debug": Gemma3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        sliding_window=4,
        layer_types=(SLIDING, GLOBAL),
        query_pre_attn_scalar=16,
        rope_theta=10_000.0,
    ),
    "gemma3-270m": Gemma3Config(),
}


def rotary_at(position_ids: Array, theta: float, dim: int, factor: float, max_positions: int) -> tuple[Array, Array]:
    """cos and sin of the rotary angles p * f at public ``position_ids`` [B, T]: two [B, T, Dh]
    arrays in HF's half layout, f = 1 / (factor * theta^(2i/Dh)) as transformers computes it in
    float32.

    With p = K a + b (K the power of two nearest sqrt(max_positions)), cos(p f) = cos(K a f)
    cos(b f) - sin(K a f) sin(b f) and sin(p f) = sin(K a f) cos(b f) + cos(K a f) sin(b f): two
    gathers from host tables of about sqrt(max_positions) rows (angles in float64) and public
    products. Within 1.5e-7 of cos(p f) in float64 for every p < 32 768; transformers rounds the
    angle p f to float32 first, so it differs from this by 5e-7 below p = 16, 1.5e-5 below 512
    and 1e-3 below 32 768 (its rounding error).
    """
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)) / np.float32(factor)  # [Dh/2]
    step = 2 ** round(math.log2(max(math.sqrt(max_positions), 1)))
    high = np.arange(-(-max_positions // step), dtype=np.float64)[:, None] * step * inv_freq  # [P/K, Dh/2]
    low = np.arange(step, dtype=np.float64)[:, None] * inv_freq  # [K, Dh/2]
    a, b = position_ids // step, position_ids % step

    def table(values, ids):
        return jnp.take(jnp.asarray(values.astype(np.float32)), ids, axis=0)  # [B, T, Dh/2]

    cos_a, sin_a, cos_b, sin_b = (
        table(np.cos(high), a),
        table(np.sin(high), a),
        table(np.cos(low), b),
        table(np.sin(low), b),
    )
    cos = cos_a * cos_b - sin_a * sin_b
    sin = sin_a * cos_b + cos_a * sin_b
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)  # [B, T, Dh]


def sliding_window_mask(mask: Array, window: int) -> Array:
    """``mask`` [B, 1, T, S] keeping, for each query, only the last ``window`` keys it sees
    (itself included): the tokens a sliding layer attends to. Public, built from the mask.

    Counted over the keys the query sees, not over cache slots, so a left-padded row gets
    the window it would get alone (transformers counts the padding slots in the window)."""
    seen_from = jnp.cumsum(mask[..., ::-1].astype(jnp.int32), axis=-1)[..., ::-1]  # keys seen at or after each slot
    return mask & (seen_from <= window)


class Gemma3DecoderLayer(nn.Module):
    config: Gemma3Config
    ops: Ops
    shifts: NormShifts = NormShifts()
    sliding: bool = False

    @nn.compact
    def __call__(self, x, cos_global, sin_global, cos_local, sin_local, mask, layer_cache, cache_index, rows=None):
        cfg = self.config

        def norm(name):
            return RMSNorm(cfg.rms_norm_eps, self.ops, self.shifts.get(name), 1.0, name=name)

        if self.sliding:
            cos, sin, mask = cos_local, sin_local, sliding_window_mask(mask, cfg.sliding_window)
        else:
            cos, sin = cos_global, sin_global
        h, layer_cache = llama.LlamaAttention(cfg, self.ops, self.shifts.under("self_attn"), name="self_attn")(
            norm("input_layernorm")(x), cos, sin, mask, layer_cache, cache_index, rows
        )
        x = x[:, row_slice(rows)] + norm("post_attention_layernorm")(h)  # [B, T', D]
        h = llama.LlamaMLP(cfg, self.ops, name="mlp")(norm("pre_feedforward_layernorm")(x))
        x = x + norm("post_feedforward_layernorm")(h)
        record(self, "residual", x)
        return x, layer_cache


class Gemma3ForCausalLM(CausalLM):
    """Gemma 3's text model with its LM head (call convention: :class:`~puma.models.layers.CausalLM`)."""

    config: Gemma3Config
    ops: Ops = EXACT
    shifts: NormShifts = NormShifts()

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = [
            Gemma3DecoderLayer(
                cfg, self.ops, self.shifts.under(f"layers_{i}"), cfg.layer_types[i] == SLIDING, name=f"layers_{i}"
            )
            for i in range(cfg.num_hidden_layers)
        ]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.ops, self.shifts.get("norm"), 1.0)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.vocab_size, use_bias=False)

    def block_inputs(self, position_ids):
        """The global and the local layers' rotary cos and sin at ``position_ids``: four [B, T, Dh]."""
        cfg = self.config
        rotary = (cfg.head_dim, cfg.max_position_embeddings)
        cos_global, sin_global = rotary_at(position_ids, cfg.rope_theta, rotary[0], cfg.rope_factor, rotary[1])
        cos_local, sin_local = rotary_at(position_ids, cfg.rope_local_base_freq, rotary[0], 1.0, rotary[1])
        return cos_global, sin_global, cos_local, sin_local

    # -- stages (puma.staged): each uses only the weights :meth:`stages` names for it ----------

    def embed_rows(self, rows, position_ids=None):
        """The table's rows times sqrt(hidden_size): [B, T, D]."""
        return rows * np.float32(math.sqrt(self.config.hidden_size))

    def head_output(self, logits):
        """The logits, soft-capped if configured: [B, T, V]."""
        cap = self.config.final_logit_softcapping
        return logits if cap is None else self.ops.tanh(logits * (1.0 / cap)) * cap

    def stages(self, head: str | None = None) -> Stages:
        cfg = self.config
        head = ("norm", "embed_tokens" if cfg.tie_word_embeddings else "lm_head")
        return Stages(
            ("embed_tokens",),
            "layers_{}",
            cfg.num_hidden_layers,
            head,
            kinds=cfg.layer_types,
            table="embed_tokens/embedding",
            tied=cfg.tie_word_embeddings,
        )


#: Hugging Face tensor name -> (Flax path, transpose). ``{i}`` stands for the layer index.
HF_MAPPING = [
    ("model.embed_tokens.weight", "embed_tokens/embedding", False),
    ("model.layers.{i}.input_layernorm.weight", "layers_{i}/input_layernorm/weight", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers_{i}/self_attn/q_proj/kernel", True),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers_{i}/self_attn/k_proj/kernel", True),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers_{i}/self_attn/v_proj/kernel", True),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers_{i}/self_attn/o_proj/kernel", True),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers_{i}/self_attn/q_proj/bias", False),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers_{i}/self_attn/k_proj/bias", False),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers_{i}/self_attn/v_proj/bias", False),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers_{i}/self_attn/o_proj/bias", False),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers_{i}/self_attn/q_norm/weight", False),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers_{i}/self_attn/k_norm/weight", False),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers_{i}/post_attention_layernorm/weight", False),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "layers_{i}/pre_feedforward_layernorm/weight", False),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "layers_{i}/post_feedforward_layernorm/weight", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers_{i}/mlp/gate_proj/kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers_{i}/mlp/up_proj/kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers_{i}/mlp/down_proj/kernel", True),
    ("model.norm.weight", "norm/weight", False),
    ("lm_head.weight", "lm_head/kernel", True),
]

#: GGUF (llama.cpp ``gemma3``) tensor name -> Hugging Face name. llama.cpp stores the norms'
#: weights plus 1 (``Family.gguf_norm_offset``) and the q/k rows unpermuted.
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
