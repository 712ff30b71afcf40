"""Qwen2 (and Qwen2.5) in Flax: LLaMA's blocks with biases on the query, key and value projections.

Matches ``transformers.Qwen2ForCausalLM`` on the same weights. The architecture is LLaMA's
(RMSNorm, rotary embeddings in the "rotate half" layout, SwiGLU, grouped-query attention, tied
or untied head) with q/k/v biases always on and none on the output projection or the MLP, so
this file is a config, its presets and the tensor names; the blocks are ``llama.py``'s.
Sliding-window layers (``use_sliding_window``, off in the released Qwen2.5 models) are refused.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from puma.models import llama


@dataclasses.dataclass(frozen=True)
class Qwen2Config(llama.RotaryDecoderConfig):
    """Qwen2 hyper-parameters under their Hugging Face names."""

    model_type: ClassVar[str] = "qwen2"
    HF_CLASS: ClassVar[str] = "Qwen2Config"
    qkv_bias: ClassVar[bool] = True
    o_bias: ClassVar[bool] = False
    mlp_bias: ClassVar[bool] = False

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 151643
    eos_token_id: int = 151643


class Qwen2ForCausalLM(llama.LlamaForCausalLM):
    """Qwen2 with its LM head: :class:`~puma.models.llama.LlamaForCausalLM` with a Qwen2 config."""


PRESETS = {
    "qwen2-debug": Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2.5-0.5b": Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        eos_token_id=151645,
    ),
}

#: Hugging Face tensor name -> (Flax path, transpose): LLaMA's (its optional q/k/v bias rows are
#: Qwen2's biases).
HF_MAPPING = llama.HF_MAPPING

#: GGUF (llama.cpp) tensor name -> Hugging Face name. llama.cpp keeps Qwen2's q/k rows in Hugging
#: Face's order (its NeoX rotary layout), so nothing is permuted.
GGUF_NAMES = {
    **llama.GGUF_NAMES,
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
}
