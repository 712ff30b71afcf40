"""GPT-2 in Flax: learned positions, pre-LayerNorm blocks, LM head tied to the token embedding.

Matches ``transformers.GPT2LMHeadModel`` on the same weights. Non-linearities (GeLU, softmax
with the attention mask, LayerNorm, the token lookup) come from the ``ops`` set.

Parameter tree (HF name -> here): ``transformer.wte.weight`` -> ``wte/embedding``,
``transformer.h.{i}.attn.c_attn.weight`` -> ``h_{i}/attn/c_attn/kernel`` (GPT-2's Conv1D already
stores ``[in, out]``: no transpose), ``transformer.ln_f.weight`` -> ``ln_f/weight``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
from puma.models.layers import (
    CausalLM,
    ConfigFields,
    Embedding,
    LayerNorm,
    Linear,
    NormShifts,
    Stages,
    attend,
    record,
    row_slice,
    update_cache,
)
from puma.protocols import Ops
from puma.protocols.exact import OPS as EXACT

Array = Any


@dataclasses.dataclass(frozen=True)
class GPT2Config(ConfigFields):
    """GPT-2 hyper-parameters under their Hugging Face names."""

    model_type: ClassVar[str] = "gpt2"
    HF_CLASS: ClassVar[str] = "GPT2Config"
    FIELDS: ClassVar[dict] = {
        "max_positions": "n_positions",
        "num_layers": "n_layer",
        "hidden": "n_embd",
        "heads": "n_head",
        "activation": "activation_function",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int = 50256
    eos_token_id: int = 50256


PRESETS = {
    "gpt2-debug": GPT2Config(
        vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=127, eos_token_id=127
    ),
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
}


class GPT2Attention(nn.Module):
    config: GPT2Config
    ops: Ops

    @nn.compact
    def __call__(self, x, mask, layer_cache, cache_index, rows=None):
        cfg = self.config
        batch, length, _ = x.shape
        qkv = Linear(3 * cfg.n_embd, name="c_attn")(x)  # [B, T, 3D]
        q, k, v = jnp.split(qkv, 3, axis=-1)  # 3 x [B, T, D]
        q, k, v = (t.reshape(batch, length, cfg.n_head, cfg.head_dim) for t in (q, k, v))  # [B, T, H, Dh]
        if layer_cache is not None:
            layer_cache = update_cache(layer_cache, k, v, cache_index)
            k, v = layer_cache["k"], layer_cache["v"]  # [B, S, H, Dh]
        keep = row_slice(rows)
        out = attend(q[:, keep], k, v, mask[:, :, keep], self.ops, self)  # [B, T', D]
        return Linear(cfg.n_embd, name="c_proj")(out), layer_cache


class GPT2MLP(nn.Module):
    config: GPT2Config
    ops: Ops

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        inner = cfg.n_inner or 4 * cfg.n_embd
        act = self.ops.activation(cfg.activation_function)
        h = Linear(inner, name="c_fc")(x)
        record(self, "activation_input", h)
        return Linear(cfg.n_embd, name="c_proj")(act(h))


class GPT2Block(nn.Module):
    config: GPT2Config
    ops: Ops
    shifts: NormShifts = NormShifts()

    @nn.compact
    def __call__(self, x, mask, layer_cache, cache_index, rows=None):
        cfg = self.config
        eps, shifts = cfg.layer_norm_epsilon, self.shifts
        h, layer_cache = GPT2Attention(cfg, self.ops, name="attn")(
            LayerNorm(eps, self.ops, shifts.get("ln_1"), name="ln_1")(x), mask, layer_cache, cache_index, rows
        )
        x = x[:, row_slice(rows)] + h  # [B, T', D]
        x = x + GPT2MLP(cfg, self.ops, name="mlp")(LayerNorm(eps, self.ops, shifts.get("ln_2"), name="ln_2")(x))
        record(self, "residual", x)
        return x, layer_cache


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with its tied language-model head (call convention: :class:`~puma.models.layers.CausalLM`)."""

    config: GPT2Config
    ops: Ops = EXACT
    shifts: NormShifts = NormShifts()

    def setup(self):
        cfg = self.config
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = Embedding(cfg.n_positions, cfg.n_embd, std=0.01)
        self.blocks = [GPT2Block(cfg, self.ops, self.shifts.under(f"h_{i}"), name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg.layer_norm_epsilon, self.ops, self.shifts.get("ln_f"))

    # -- stages (puma.staged): each uses only the weights :meth:`stages` names for it ----------

    def embed(self, input_ids, position_ids):
        """Token plus position embeddings [B, T, D]."""
        return self.embed_rows(self.wte(input_ids, self.ops), position_ids)

    def embed_rows(self, rows, position_ids):
        """The token table's rows plus the position embeddings: [B, T, D]."""
        return rows + self.wpe.take_public(position_ids)

    def head_input(self, x):
        return self.ln_f(x)

    def head(self, x):
        """Final LayerNorm and the tied LM head: [B, T, D] -> logits [B, T, V]."""
        return self.wte.attend(self.head_input(x))

    def stages(self, head: str | None = None) -> Stages:
        return Stages(("wte", "wpe"), "h_{}", self.config.n_layer, ("ln_f", "wte"), table="wte/embedding", tied=True)


#: Hugging Face tensor name -> (Flax path, transpose). ``{i}`` stands for the layer index.
HF_MAPPING = [
    ("transformer.wte.weight", "wte/embedding", False),
    ("transformer.wpe.weight", "wpe/embedding", False),
    ("transformer.h.{i}.ln_1.weight", "h_{i}/ln_1/weight", False),
    ("transformer.h.{i}.ln_1.bias", "h_{i}/ln_1/bias", False),
    ("transformer.h.{i}.attn.c_attn.weight", "h_{i}/attn/c_attn/kernel", False),
    ("transformer.h.{i}.attn.c_attn.bias", "h_{i}/attn/c_attn/bias", False),
    ("transformer.h.{i}.attn.c_proj.weight", "h_{i}/attn/c_proj/kernel", False),
    ("transformer.h.{i}.attn.c_proj.bias", "h_{i}/attn/c_proj/bias", False),
    ("transformer.h.{i}.ln_2.weight", "h_{i}/ln_2/weight", False),
    ("transformer.h.{i}.ln_2.bias", "h_{i}/ln_2/bias", False),
    ("transformer.h.{i}.mlp.c_fc.weight", "h_{i}/mlp/c_fc/kernel", False),
    ("transformer.h.{i}.mlp.c_fc.bias", "h_{i}/mlp/c_fc/bias", False),
    ("transformer.h.{i}.mlp.c_proj.weight", "h_{i}/mlp/c_proj/kernel", False),
    ("transformer.h.{i}.mlp.c_proj.bias", "h_{i}/mlp/c_proj/bias", False),
    ("transformer.ln_f.weight", "ln_f/weight", False),
    ("transformer.ln_f.bias", "ln_f/bias", False),
]
