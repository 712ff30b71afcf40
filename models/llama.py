"""LLaMA in Flax: RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query attention.

Matches ``transformers.LlamaForCausalLM`` on the same weights (rotary embedding in HF's
"rotate half" layout, ``rope_theta`` from the config, tied or untied LM head). Non-linearities
(SiLU, softmax with the attention mask, RMSNorm, the token lookup) come from the ``ops`` set.

Rotary tables are computed on the host for every position up to ``max_position_embeddings`` and
gathered by (public) position ids, so no sine or cosine is evaluated under MPC.

The Qwen families (``qwen2.py``, ``qwen3.py``) are these blocks with other configs: the flags of
:class:`RotaryDecoderConfig` add their query/key/value biases and per-head query/key RMSNorm.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from puma.models.layers import (
    CausalLM,
    ConfigFields,
    Embedding,
    Linear,
    NormShifts,
    RMSNorm,
    Stages,
    attend,
    hf_fields,
    joined_linear,
    project,
    record,
    row_slice,
    update_cache,
)
from puma.protocols import Ops
from puma.protocols.exact import OPS as EXACT

Array = Any


class RotaryDecoderConfig(ConfigFields):
    """What the LLaMA blocks read from a config besides its fields, shared by the families built
    from them (LLaMA, Qwen2, Qwen3, Gemma 3): the Hugging Face field names, which projections have biases,
    whether queries and keys are RMS-normalised per head, and the checks and conversion of
    :meth:`from_hf`. A family overrides the flags where its architecture fixes them."""

    FIELDS: ClassVar[dict] = {
        "max_positions": "max_position_embeddings",
        "num_layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "activation": "hidden_act",
    }
    #: Queries and keys go through an RMSNorm over each head's Dh before the rotation (Qwen3, Gemma 3).
    qk_norm: ClassVar[bool] = False
    #: The norms scale by this plus their weight (Gemma stores its norms' weights as offsets from 1).
    norm_offset: ClassVar[float] = 0.0

    @property
    def query_scale(self) -> float:
        """Factor on the rotated queries besides the scores' 1/sqrt(Dh) (1: none; Gemma's
        ``query_pre_attn_scalar`` makes it sqrt(Dh / scalar))."""
        return 1.0

    @property
    def qkv_bias(self) -> bool:
        """The query, key and value projections have biases."""
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        """The attention's output projection has a bias."""
        return self.attention_bias

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf(cls, hf_config):
        """Build from a transformers config; rope scaling other than none and sliding-window
        layers are refused."""
        scaling = getattr(hf_config, "rope_scaling", None)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ValueError(f"rope_scaling {scaling!r} is not supported (only unscaled rotary embeddings)")
        if "sliding_attention" in (getattr(hf_config, "layer_types", None) or ()):
            raise ValueError("sliding-window attention layers are not supported (use_sliding_window must be false)")
        kwargs = hf_fields(cls, hf_config)
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            kwargs["eos_token_id"] = eos[0]
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class LlamaConfig(RotaryDecoderConfig):
    """LLaMA hyper-parameters under their Hugging Face names."""

    model_type: ClassVar[str] = "llama"
    HF_CLASS: ClassVar[str] = "LlamaConfig"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2


PRESETS = {
    "llama-debug": LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-7b": LlamaConfig(),
    "llama2-13b": LlamaConfig(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
}


def rotary_tables(config: RotaryDecoderConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin for every position: two [max_positions, head_dim] float32 tables.

    Computed in float32 the way transformers does, so angles round identically.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    inv_freq = np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)  # [Dh/2]
    positions = np.arange(config.max_position_embeddings, dtype=np.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # [P, Dh/2]
    angles = np.concatenate([freqs, freqs], axis=-1)  # [P, Dh]
    return np.cos(angles), np.sin(angles)


def rotate(x: Array, cos: Array, sin: Array) -> Array:
    """x * cos + rotate_half(x) * sin; x [B, T, H, Dh], cos/sin [B, T, Dh]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def rotation_matrices(cos: Array, sin: Array) -> Array:
    """R [B, T, Dh, Dh] with x @ R = :func:`rotate` (x): diag(cos) + P diag(sin), where P is
    rotate_half's signed permutation (rotate_half(x) = x @ P). Public, built from positions."""
    dh = cos.shape[-1]
    half = dh // 2
    perm = np.zeros((dh, dh), np.float32)
    perm[np.arange(half) + half, np.arange(half)] = -1.0  # rotated[j] = -x[j + half] for j < half
    perm[np.arange(half), np.arange(half) + half] = 1.0  # rotated[j] = x[j - half] for j >= half
    return jnp.eye(dh, dtype=cos.dtype) * cos[..., None, :] + perm * sin[..., None, :]  # [B, T, Dh, Dh]


class LlamaAttention(nn.Module):
    """Grouped-query attention with rotary embeddings; biases and the per-head query/key
    RMSNorm as the config's flags say (:class:`RotaryDecoderConfig`)."""

    config: RotaryDecoderConfig
    ops: Ops
    shifts: NormShifts = NormShifts()

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, cache_index, rows=None):
        cfg = self.config
        batch, length, _ = x.shape
        heads, kv_heads, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        plan = self.ops.plan
        keep = row_slice(rows)
        projections = [
            Linear(heads * dh, cfg.qkv_bias, name="q_proj"),
            Linear(kv_heads * dh, cfg.qkv_bias, name="k_proj"),
            Linear(kv_heads * dh, cfg.qkv_bias, name="v_proj"),
        ]
        if plan.fused_projections:  # one product for all rows; only the kept rows' queries are used
            q, k, v = project(x, projections, True, joined_linear(self, "qkv_proj", projections))
            q = q[:, keep]
        else:
            q, k, v = projections[0](x[:, keep]), projections[1](x), projections[2](x)
        q = q.reshape(batch, q.shape[1], heads, dh)  # [B, T', H, Dh]
        k = k.reshape(batch, length, kv_heads, dh)  # [B, T, Hkv, Dh]
        v = v.reshape(batch, length, kv_heads, dh)
        if cfg.qk_norm:  # each head's query and key normalised over its Dh
            q = RMSNorm(cfg.rms_norm_eps, self.ops, self.shifts.get("q_norm"), cfg.norm_offset, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, self.ops, self.shifts.get("k_norm"), cfg.norm_offset, name="k_norm")(k)
        if plan.fused_rotary:
            q, k = self.rotate_scaled(q, k, cos, sin, keep)
        else:
            q, k = rotate(q, cos[:, keep], sin[:, keep]), rotate(k, cos, sin)
        if cfg.query_scale != 1.0:
            q = q * cfg.query_scale
        if layer_cache is not None:
            layer_cache = update_cache(layer_cache, k, v, cache_index)
            k, v = layer_cache["k"], layer_cache["v"]  # [B, S, Hkv, Dh]
        out = attend(q, k, v, mask[:, :, keep], self.ops, self, scaled=plan.fused_rotary)  # [B, T', H * Dh]
        return Linear(cfg.hidden_size, cfg.o_bias, name="o_proj")(out), layer_cache

    def rotate_scaled(self, q, k, cos, sin, keep):
        """Rotated queries and keys, each times Dh^(-1/4), so that their products are the scores
        (q k / sqrt(Dh)) with no scaling left: q [B, T', H, Dh] and k [B, T, Hkv, Dh] (T' = T or
        the last row). The cache keeps the keys so scaled (every step scales its keys the same
        way). One product by a public [Dh, Dh] matrix for all heads of a single token (a decode
        step), else the rotation's two products by public tables on queries and keys together."""
        heads = q.shape[2]
        scale = q.shape[3] ** -0.25
        if q.shape[1] != k.shape[1]:  # the last row's queries only
            return rotate(q, cos[:, keep] * scale, sin[:, keep] * scale), rotate(k, cos * scale, sin * scale)
        both = jnp.concatenate([q, k], axis=2)  # [B, T, H + Hkv, Dh]
        if both.shape[:2] == (1, 1):
            rot = rotation_matrices(cos, sin)[0, 0] * scale  # [Dh, Dh], public
            both = jnp.einsum("bthd,de->bthe", both, rot)  # one product: [H + Hkv, Dh] @ [Dh, Dh]
        else:
            both = rotate(both, cos * scale, sin * scale)
        return both[:, :, :heads], both[:, :, heads:]


class LlamaMLP(nn.Module):
    config: RotaryDecoderConfig
    ops: Ops

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        act = self.ops.activation(cfg.hidden_act)
        projections = [
            Linear(cfg.intermediate_size, cfg.mlp_bias, name="gate_proj"),
            Linear(cfg.intermediate_size, cfg.mlp_bias, name="up_proj"),
        ]
        joined = joined_linear(self, "gate_up_proj", projections)
        gate, up = project(x, projections, self.ops.plan.fused_projections, joined)
        record(self, "activation_input", gate)
        gated = act(gate) * up
        record(self, "gated_product", gated)
        return Linear(cfg.hidden_size, cfg.mlp_bias, name="down_proj")(gated)


class LlamaDecoderLayer(nn.Module):
    config: RotaryDecoderConfig
    ops: Ops
    shifts: NormShifts = NormShifts()

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, cache_index, rows=None):
        cfg = self.config
        h, layer_cache = LlamaAttention(cfg, self.ops, self.shifts.under("self_attn"), name="self_attn")(
            RMSNorm(cfg.rms_norm_eps, self.ops, self.shifts.get("input_layernorm"), name="input_layernorm")(x),
            cos,
            sin,
            mask,
            layer_cache,
            cache_index,
            rows,
        )
        x = x[:, row_slice(rows)] + h  # [B, T', D]
        post = self.shifts.get("post_attention_layernorm")
        x = x + LlamaMLP(cfg, self.ops, name="mlp")(
            RMSNorm(cfg.rms_norm_eps, self.ops, post, name="post_attention_layernorm")(x)
        )
        record(self, "residual", x)
        return x, layer_cache


class LlamaForCausalLM(CausalLM):
    """LLaMA with its LM head (call convention: :class:`~puma.models.layers.CausalLM`); with a
    Qwen config, Qwen2's or Qwen3's model (see ``qwen2.py``, ``qwen3.py``)."""

    config: RotaryDecoderConfig
    ops: Ops = EXACT
    shifts: NormShifts = NormShifts()

    def setup(self):
        cfg = self.config
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = [
            LlamaDecoderLayer(cfg, self.ops, self.shifts.under(f"layers_{i}"), name=f"layers_{i}")
            for i in range(cfg.num_hidden_layers)
        ]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.ops, self.shifts.get("norm"))
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.vocab_size, use_bias=False)

    def block_inputs(self, position_ids):
        """The rotary tables at ``position_ids``: (cos, sin), each [B, T, Dh]."""
        cos_table, sin_table = rotary_tables(self.config)
        cos = jnp.take(jnp.asarray(cos_table), position_ids, axis=0)  # [B, T, Dh]
        sin = jnp.take(jnp.asarray(sin_table), position_ids, axis=0)
        return cos, sin

    # -- stages (puma.staged): each uses only the weights :meth:`stages` names for it ----------

    def stages(self, head: str | None = None) -> Stages:
        cfg = self.config
        head = ("norm", "embed_tokens" if cfg.tie_word_embeddings else "lm_head")
        return Stages(
            ("embed_tokens",),
            "layers_{}",
            cfg.num_hidden_layers,
            head,
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
    ("model.layers.{i}.post_attention_layernorm.weight", "layers_{i}/post_attention_layernorm/weight", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers_{i}/mlp/gate_proj/kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers_{i}/mlp/up_proj/kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers_{i}/mlp/down_proj/kernel", True),
    ("model.layers.{i}.mlp.gate_proj.bias", "layers_{i}/mlp/gate_proj/bias", False),
    ("model.layers.{i}.mlp.up_proj.bias", "layers_{i}/mlp/up_proj/bias", False),
    ("model.layers.{i}.mlp.down_proj.bias", "layers_{i}/mlp/down_proj/bias", False),
    ("model.norm.weight", "norm/weight", False),
    ("lm_head.weight", "lm_head/kernel", True),
]

#: Projections of one input that a set with ``fused_projections`` multiplies as one product:
#: (module, its projections, the joined Linear's name). The model owner stores their kernels and
#: biases side by side along the outputs for such a set (:func:`puma.models.loading.join_projections`).
JOINS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"), ("mlp", ("gate_proj", "up_proj"), "gate_up_proj"))

#: GGUF (llama.cpp) tensor name -> Hugging Face name. llama.cpp stores LLaMA's q/k rows permuted
#: for its interleaved rotary layout; :mod:`puma.models.gguf` undoes that permutation
#: (``Family.gguf_permuted_rotary``).
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
