"""BERT in Flax: word + position + token-type embeddings, post-LayerNorm encoder blocks.

Matches ``transformers.BertModel`` / ``BertForSequenceClassification`` on the same weights.
Heads, chosen per call: ``"hidden"`` (last hidden state), ``"pooled"`` (the tanh pooler on
[CLS]), ``"mean"`` (mask-weighted mean of the last hidden state, the sentence-transformers
embedding before its L2 normalisation) and ``"classify"`` (pooler + classifier logits).
Non-linearities (GeLU, tanh, softmax with the padding mask, LayerNorm, the token and token-type
lookups) come from the ``ops`` set.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from puma.models.layers import (
    ConfigFields,
    Embedding,
    LayerNorm,
    Linear,
    NormShifts,
    Stages,
    attend,
    hf_fields,
    padding_mask,
    record,
    row_slice,
)
from puma.protocols import Ops
from puma.protocols.exact import OPS as EXACT

Array = Any
HEADS = ("hidden", "pooled", "mean", "classify")


@dataclasses.dataclass(frozen=True)
class BertConfig(ConfigFields):
    """BERT hyper-parameters under their Hugging Face names.

    ``architectures`` decides whether the checkpoint has a classifier head
    (``BertForSequenceClassification``); ``id2label`` lists its label names in id order.
    """

    model_type: ClassVar[str] = "bert"
    FIELDS: ClassVar[dict] = {
        "max_positions": "max_position_embeddings",
        "num_layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "activation": "hidden_act",
    }

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    architectures: tuple[str, ...] = ("BertModel",)
    id2label: tuple[str, ...] = ()

    @classmethod
    def from_hf(cls, hf_config) -> "BertConfig":
        """Build from a ``transformers.BertConfig``; only absolute position embeddings are supported."""
        kind = getattr(hf_config, "position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"position_embedding_type {kind!r} is not supported (only 'absolute')")
        kwargs = hf_fields(cls, hf_config)
        kwargs["architectures"] = tuple(getattr(hf_config, "architectures", None) or ("BertModel",))
        labels = getattr(hf_config, "id2label", None) or {}
        classifies = "BertForSequenceClassification" in kwargs["architectures"]
        kwargs["id2label"] = tuple(labels[k] for k in sorted(labels, key=int)) if classifies else ()
        if kwargs.get("pad_token_id") is None:
            kwargs["pad_token_id"] = 0
        return cls(**kwargs)

    def to_hf(self):
        """The equivalent ``transformers.BertConfig`` (for references and saving)."""
        from transformers import BertConfig as HFConfig

        kwargs = dataclasses.asdict(self)
        labels = kwargs.pop("id2label")
        kwargs["architectures"] = list(kwargs["architectures"])
        if labels:
            kwargs["id2label"] = dict(enumerate(labels))
            kwargs["label2id"] = {label: i for i, label in enumerate(labels)}
        return HFConfig(**kwargs)

    @property
    def has_classifier(self) -> bool:
        return "BertForSequenceClassification" in self.architectures

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


PRESETS = {
    "bert-debug": BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
    "bert-debug-cls": BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        architectures=("BertForSequenceClassification",),
        id2label=("negative", "positive"),
    ),
    "bert-base": BertConfig(),
    # RoBERTa-base shapes (vocabulary 50265, 514 positions, one token type) for cost tables
    "roberta-base": BertConfig(
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1
    ),
    "bert-large": BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


class BertSelfAttention(nn.Module):
    config: BertConfig
    ops: Ops

    @nn.compact
    def __call__(self, x, mask, rows=None):
        cfg = self.config
        batch, length, _ = x.shape
        heads, dh = cfg.num_attention_heads, cfg.head_dim
        keep = row_slice(rows)
        xq = x[:, keep]  # the rows that get queries: [B, T', D]
        q = Linear(cfg.hidden_size, name="query")(xq).reshape(batch, xq.shape[1], heads, dh)  # [B, T', H, Dh]
        k = Linear(cfg.hidden_size, name="key")(x).reshape(batch, length, heads, dh)  # [B, T, H, Dh]
        v = Linear(cfg.hidden_size, name="value")(x).reshape(batch, length, heads, dh)
        return attend(q, k, v, mask[:, :, keep], self.ops, self)  # [B, T', D]


class BertSubLayerOutput(nn.Module):
    """dense -> residual add -> LayerNorm (HF's ``BertSelfOutput`` and ``BertOutput``)."""

    config: BertConfig
    ops: Ops
    shift: int = 0

    @nn.compact
    def __call__(self, h, residual):
        cfg = self.config
        return LayerNorm(cfg.layer_norm_eps, self.ops, self.shift, name="LayerNorm")(
            Linear(cfg.hidden_size, name="dense")(h) + residual
        )


class BertLayer(nn.Module):
    config: BertConfig
    ops: Ops
    shifts: NormShifts = NormShifts()

    @nn.compact
    def __call__(self, x, mask, rows=None):
        cfg = self.config
        attn = BertSelfAttention(cfg, self.ops, name="attention_self")(x, mask, rows)
        x = BertSubLayerOutput(cfg, self.ops, self.shifts.get("attention_output/LayerNorm"), name="attention_output")(
            attn, x[:, row_slice(rows)]
        )  # [B, T', D]
        act = self.ops.activation(cfg.hidden_act)
        h = Linear(cfg.intermediate_size, name="intermediate_dense")(x)
        record(self, "activation_input", h)
        x = BertSubLayerOutput(cfg, self.ops, self.shifts.get("output/LayerNorm"), name="output")(act(h), x)
        record(self, "residual", x)
        return x


class BertModel(nn.Module):
    """BERT encoder with the head chosen per call.

    Call with ``input_ids`` [B, T], ``attention_mask`` [B, T] (1 = real token),
    ``token_type_ids`` [B, T] and ``position_ids`` [B, T] (defaults: all ones, zeros, 0..T-1)
    and ``head`` (one of ``HEADS``). Returns [B, T, D] for ``"hidden"``, [B, D] for ``"pooled"``
    and ``"mean"``, [B, num_labels] for ``"classify"``.
    """

    config: BertConfig
    ops: Ops = EXACT
    shifts: NormShifts = NormShifts()
    causal: ClassVar[bool] = False

    def setup(self):
        cfg = self.config
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embeddings_LayerNorm = LayerNorm(cfg.layer_norm_eps, self.ops, self.shifts.get("embeddings_LayerNorm"))
        self.layer = [
            BertLayer(cfg, self.ops, self.shifts.under(f"layer_{i}"), name=f"layer_{i}")
            for i in range(cfg.num_hidden_layers)
        ]
        self.pooler = Linear(cfg.hidden_size)
        if cfg.has_classifier:
            self.classifier = Linear(cfg.num_labels)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, head: str = "hidden"):
        cfg = self.config
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {head!r}")
        if head == "classify" and not cfg.has_classifier:
            raise ValueError("this BERT has no classifier head (architectures lacks BertForSequenceClassification)")
        batch, length = input_ids.shape[:2]  # [B, T] ids or [B, T, V] client one-hot rows
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((batch, length), jnp.int32)
            if self.ops.plan.client_onehot:
                token_type_ids = jax.nn.one_hot(token_type_ids, cfg.type_vocab_size, dtype=jnp.float32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

        x = self.embed(input_ids, token_type_ids, position_ids)  # [B, T, D]
        mask = padding_mask(attention_mask, length)  # [B, 1, T, T]
        for i, layer in enumerate(self.layer):
            x = layer(x, mask, self.block_rows(head) if i == len(self.layer) - 1 else None)
        return self.head(x, attention_mask, head)

    # -- stages (puma.staged): each uses only the weights :meth:`stages` names for it ----------

    def embed(self, input_ids, token_type_ids, position_ids):
        """Word + token-type + position embeddings and their LayerNorm: [B, T, D]."""
        x = (
            self.word_embeddings(input_ids, self.ops)
            + self.token_type_embeddings(token_type_ids, self.ops)
            + self.position_embeddings.take_public(position_ids)
        )
        return self.embeddings_LayerNorm(x)

    # -- the programs tasks call (FamilyModule) --------------------------------------------------

    def encode(self, input_ids, attention_mask, token_type_ids, position_ids, head: str):
        """The output of ``head`` (see the class doc)."""
        return self(input_ids, attention_mask, token_type_ids, position_ids, head=head)

    def stage_embed(self, secret: dict, public: dict):
        return self.embed(secret["input_ids"], secret["token_type_ids"], public["position_ids"])

    def stage_block(self, h, public: dict, layer_cache, layer: int, phase: str, max_len: int, rows: str | None):
        """Encoder layer ``layer`` (encoders keep no cache: every phase is one pass)."""
        return self.block(h, public["attention_mask"], rows, layer), None

    def stage_head(self, h, public: dict, head: str | None = None):
        """The output of ``head`` (None: the widest head this checkpoint has)."""
        return self.head(h, public["attention_mask"], head or self.widest_head())

    def widest_head(self) -> str:
        return "classify" if self.config.has_classifier else "pooled"

    def block(self, x, attention_mask, rows: str | None = None, layer: int = 0):
        """Encoder layer ``layer`` on x [B, T, D] (its weights under its own name); ``rows`` as
        for :func:`~puma.models.layers.row_slice`."""
        return self.layer[layer](x, padding_mask(attention_mask, x.shape[1]), rows)

    def block_rows(self, head: str) -> str | None:
        """The rows the last layer must compute for ``head``: only [CLS] for pooled and
        classifier heads when the set saves on the last layer, else all."""
        return "first" if self.ops.plan.last_layer_rows and head in ("pooled", "classify") else None

    def head(self, x, attention_mask, head: str = "hidden"):
        """The output of ``head`` (see the class doc) from the last hidden state x [B, T, D]."""
        if head == "hidden":
            return x
        if head == "mean":
            weights = jnp.asarray(attention_mask, x.dtype)  # [B, T]
            return jnp.einsum("bt,btd->bd", weights, x) / jnp.sum(weights, axis=-1, keepdims=True)
        pooled = self.ops.tanh(self.pooler(x[:, 0]))  # [B, D]
        return pooled if head == "pooled" else self.classifier(pooled)

    def stages(self, head: str | None = None) -> Stages:
        """The stages' weights for ``head`` (None: the widest this checkpoint has)."""
        head = head or self.widest_head()
        embed = ("word_embeddings", "position_embeddings", "token_type_embeddings", "embeddings_LayerNorm")
        head_keys = {"hidden": (), "mean": (), "pooled": ("pooler",), "classify": ("pooler", "classifier")}[head]
        return Stages(embed, "layer_{}", self.config.num_hidden_layers, head_keys)


def init_kwargs(config: BertConfig) -> dict:
    """The head a shape-only init builds: the classifier where the checkpoint has one."""
    return {"head": "classify" if config.has_classifier else "pooled"}


#: Hugging Face tensor name -> (Flax path, transpose). ``{i}`` stands for the layer index.
HF_MAPPING = [
    ("bert.embeddings.word_embeddings.weight", "word_embeddings/embedding", False),
    ("bert.embeddings.position_embeddings.weight", "position_embeddings/embedding", False),
    ("bert.embeddings.token_type_embeddings.weight", "token_type_embeddings/embedding", False),
    ("bert.embeddings.LayerNorm.weight", "embeddings_LayerNorm/weight", False),
    ("bert.embeddings.LayerNorm.bias", "embeddings_LayerNorm/bias", False),
    ("bert.encoder.layer.{i}.attention.self.query.weight", "layer_{i}/attention_self/query/kernel", True),
    ("bert.encoder.layer.{i}.attention.self.query.bias", "layer_{i}/attention_self/query/bias", False),
    ("bert.encoder.layer.{i}.attention.self.key.weight", "layer_{i}/attention_self/key/kernel", True),
    ("bert.encoder.layer.{i}.attention.self.key.bias", "layer_{i}/attention_self/key/bias", False),
    ("bert.encoder.layer.{i}.attention.self.value.weight", "layer_{i}/attention_self/value/kernel", True),
    ("bert.encoder.layer.{i}.attention.self.value.bias", "layer_{i}/attention_self/value/bias", False),
    ("bert.encoder.layer.{i}.attention.output.dense.weight", "layer_{i}/attention_output/dense/kernel", True),
    ("bert.encoder.layer.{i}.attention.output.dense.bias", "layer_{i}/attention_output/dense/bias", False),
    ("bert.encoder.layer.{i}.attention.output.LayerNorm.weight", "layer_{i}/attention_output/LayerNorm/weight", False),
    ("bert.encoder.layer.{i}.attention.output.LayerNorm.bias", "layer_{i}/attention_output/LayerNorm/bias", False),
    ("bert.encoder.layer.{i}.intermediate.dense.weight", "layer_{i}/intermediate_dense/kernel", True),
    ("bert.encoder.layer.{i}.intermediate.dense.bias", "layer_{i}/intermediate_dense/bias", False),
    ("bert.encoder.layer.{i}.output.dense.weight", "layer_{i}/output/dense/kernel", True),
    ("bert.encoder.layer.{i}.output.dense.bias", "layer_{i}/output/dense/bias", False),
    ("bert.encoder.layer.{i}.output.LayerNorm.weight", "layer_{i}/output/LayerNorm/weight", False),
    ("bert.encoder.layer.{i}.output.LayerNorm.bias", "layer_{i}/output/LayerNorm/bias", False),
    ("bert.pooler.dense.weight", "pooler/kernel", True),
    ("bert.pooler.dense.bias", "pooler/bias", False),
    ("classifier.weight", "classifier/kernel", True),
    ("classifier.bias", "classifier/bias", False),
]
