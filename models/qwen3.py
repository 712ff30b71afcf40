"""Qwen3 in Flax: LLaMA's blocks with an RMSNorm on each head's query and key.

Matches ``transformers.Qwen3ForCausalLM`` on the same weights. The architecture is LLaMA's with
``q_norm``/``k_norm`` (one RMSNorm over each head's Dh, before the rotation), a ``head_dim``
of its own (Qwen3-0.6B: 16 heads of 128 over a hidden size of 1024) and biases only when
``attention_bias`` says so, so this file is a config, its presets and the tensor names; the
blocks are ``llama.py``'s. Sliding-window layers (``use_sliding_window``) are refused.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from puma.models import llama


@dataclasses.dataclass(frozen=True)
class Qwen3Config(llama.RotaryDecoderConfig):
    """Qwen3 hyper-parameters under their Hugging Face names."""

    model_type: ClassVar[str] = "qwen3"
    HF_CLASS: ClassVar[str] = "Qwen3Config"
    qk_norm: ClassVar[bool] = True
    mlp_bias: ClassVar[bool] = False

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128  # not necessarily hidden_size / num_attention_heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int = 151643
    eos_token_id: int = 151645


class Qwen3ForCausalLM(llama.LlamaForCausalLM):
    """Qwen3 with its LM head: :class:`~puma.models.llama.LlamaForCausalLM` with a Qwen3 config."""


PRESETS = {
    "qwen3-debug": Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen3-0.6b": Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
}

#: Hugging Face tensor name -> (Flax path, transpose): LLaMA's and the per-head query/key norms.
HF_MAPPING = llama.HF_MAPPING + [
    ("model.layers.{i}.self_attn.q_norm.weight", "layers_{i}/self_attn/q_norm/weight", False),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers_{i}/self_attn/k_norm/weight", False),
]

#: GGUF (llama.cpp) tensor name -> Hugging Face name. llama.cpp keeps Qwen3's q/k rows in Hugging
#: Face's order (its NeoX rotary layout), so nothing is permuted.
GGUF_NAMES = {
    **llama.GGUF_NAMES,
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
