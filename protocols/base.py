"""The :class:`Ops` container that models take their non-linearities from."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

#: Score given to masked attention positions before the softmax. Far below any real score and
#: far below PUMA's -14 clip, yet small enough to stay exact in FM64 with 18 fraction bits
#: (2^45 integer range): a fixed-point-safe replacement for ``finfo(float32).min``.
MASK_FILL = 1.0e4

Array = Any


@dataclasses.dataclass(frozen=True)
class SpuSettings:
    """SPU settings an approximation set relies on.

    ``runtime`` holds ``spu.RuntimeConfig`` field names and values (for example
    ``("fxp_exp_mode", "EXP_TAYLOR")``); ``compiler`` holds ``spu.CompilerOptions`` fields.
    Enum values are given by name. Stored as tuples of pairs so the set stays hashable.
    """

    runtime: tuple[tuple[str, Any], ...] = ()
    compiler: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Ops:
    """A named set of the non-linear functions a Transformer needs.

    Every function is a pure ``jax.numpy`` function, so it traces to the same XLA whether it
    runs in plaintext or is compiled for SPU.

    Attributes:
        name: registry name (``"exact"``, ``"puma"``, ...).
        gelu: erf GeLU (BERT ``hidden_act="gelu"``).
        gelu_tanh: tanh GeLU (GPT-2 ``"gelu_new"``).
        silu: x * sigmoid(x) (LLaMA).
        tanh: tanh (BERT pooler).
        softmax: ``softmax(x, where)`` over the last axis; positions where ``where`` is false get
            probability exactly 0. This is the only place an attention mask is applied.
        layer_norm: ``layer_norm(x, weight, bias, eps)`` over the last axis.
        rms_norm: ``rms_norm(x, weight, eps)`` over the last axis.
        embed: ``embed(ids, table)``: rows of ``table`` for integer ``ids`` (the ids may be secret);
            with ``client_onehot`` it receives one-hot rows ``[..., V]`` instead of ids.
        argmax: ``argmax(x)`` over the last axis as an int32 index (greedy decoding under MPC).
        client_onehot: the client one-hot encodes token ids (it knows them) and shares the
            rows, instead of the parties building the one-hot from shared ids.
        fused_heads: attention multiplies all heads in one matrix product against block-diagonal
            keys and values (same outputs and bytes, one round instead of one per head).
        last_layer_rows: the last block computes queries, attention outputs and the feed-forward
            only for the rows the head reads (the last position when only the last logits are
            wanted, the [CLS] row for pooled and classifier heads); keys and values still come
            from every row, so outputs and caches are unchanged.
        spu: SPU runtime/compiler settings the set is designed for.
        description: one line for listings and reports.
    """

    name: str
    gelu: Callable[[Array], Array]
    gelu_tanh: Callable[[Array], Array]
    silu: Callable[[Array], Array]
    tanh: Callable[[Array], Array]
    softmax: Callable[[Array, Array | None], Array]
    layer_norm: Callable[[Array, Array, Array, float], Array]
    rms_norm: Callable[[Array, Array, float], Array]
    embed: Callable[[Array, Array], Array]
    argmax: Callable[[Array], Array]
    client_onehot: bool = False
    fused_heads: bool = False
    last_layer_rows: bool = False
    spu: SpuSettings = SpuSettings()
    description: str = ""

    def as_middle_layer(self) -> "Ops":
        """This set with every block computed in full, as a middle layer is: per-layer cost cuts
        (the difference of a 1- and a 0-layer run) measure a middle layer, not the last."""
        return dataclasses.replace(self, last_layer_rows=False) if self.last_layer_rows else self

    def activation(self, hf_name: str) -> Callable[[Array], Array]:
        """The function for a Hugging Face activation name (``hidden_act`` and friends)."""
        table = {
            "gelu": self.gelu,
            "gelu_new": self.gelu_tanh,
            "gelu_pytorch_tanh": self.gelu_tanh,
            "gelu_fast": self.gelu_tanh,
            "silu": self.silu,
            "swish": self.silu,
        }
        if hf_name not in table:
            raise ValueError(f"activation {hf_name!r} is not supported; supported: {', '.join(sorted(table))}")
        return table[hf_name]
