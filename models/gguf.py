"""GGUF files (llama.cpp): a model's family, config, tokenizer and tensors from the file's
metadata and memory map. The file's architecture (``general.architecture``: ``llama``,
``qwen2``, ``qwen3``) names the family in :data:`puma.models.loading.FAMILIES`, whose
``gguf_names`` map its tensors to Hugging Face names. Quantized tensors are dequantized when
read, and the q/k rows llama.cpp permutes for LLaMA's rotary layout are put back in Hugging
Face's order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re

import numpy as np
from puma.models.layers import Family

from puma.errors import PumaError
from puma.runtime.params import TensorRef

log = logging.getLogger(__name__)


def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its interleaved rotary pairs -> HF's halves).

    llama.cpp's converter reorders each head's rows from ``[half 0, half 1]`` to interleaved
    pairs; ``weight`` is ``[heads * head_dim, in]``.
    """
    head_dim = weight.shape[0] // heads
    w = weight.reshape(heads, head_dim // 2, 2, *weight.shape[1:])  # [H, Dh/2, 2, in]
    return w.swapaxes(1, 2).reshape(weight.shape)  # [H, 2, Dh/2, in] -> rows back in HF order


def _gguf_tensors(reader, family: Family, config) -> dict[str, TensorRef]:
    """The GGUF file's tensors under HF names; each is dequantized (and, for a family whose q/k
    rows llama.cpp permuted, those unpermuted) when read, from the reader's memory map."""
    patterns = [
        (re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in family.gguf_names.items()
    ]
    tensors = {}
    for tensor in reader.tensors:
        for pattern, hf_name in patterns:
            match = pattern.match(tensor.name)
            if match:
                break
        else:
            log.debug("ignoring GGUF tensor %s", tensor.name)
            continue
        check_type(tensor)
        name = hf_name.format(i=match.group(1)) if match.groups() else hf_name
        heads = None
        if family.gguf_permuted_rotary and name.endswith("q_proj.weight"):
            heads = config.num_attention_heads
        elif family.gguf_permuted_rotary and name.endswith("k_proj.weight"):
            heads = config.num_key_value_heads
        offset = family.gguf_norm_offset if name.endswith("norm.weight") else 0.0
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF dims are [in, out]
        tensors[name] = TensorRef(
            shape,
            lambda tensor=tensor, shape=shape, heads=heads, offset=offset: _gguf_read(tensor, shape, heads, offset),
        )
    return tensors


def _gguf_read(tensor, shape: tuple, heads: int | None, offset: float = 0.0) -> np.ndarray:
    data = decode(tensor).reshape(shape)
    if offset:  # a norm weight llama.cpp stored as offset + weight
        data = data - np.float32(offset)
    return unpermute_rotary_rows(data, heads) if heads else data


#: The GGUF tensor types puma decodes: floats, llama.cpp's legacy block formats and its
#: k-quants (what Q4_K_M and friends mix), each checked against the ``gguf`` package's reference
#: dequantizer in ``tests/test_gguf.py``.
DECODED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def check_type(tensor) -> None:
    """Refuse, naming the tensor and its type, a tensor whose type puma does not decode."""
    kind = tensor.tensor_type.name
    if kind not in DECODED_TYPES:
        raise PumaError(
            f"GGUF tensor {tensor.name} has type {kind}, which puma does not decode "
            f"(it decodes {', '.join(DECODED_TYPES)}): convert the file with llama.cpp's llama-quantize"
        )


def decode(tensor) -> np.ndarray:
    """A GGUF reader tensor's values as float32, shaped as the reader shapes it but with the
    last axis in elements, not bytes: the ``gguf`` package's dequantizer on its raw blocks
    (BF16 and the block formats arrive as bytes; F16 and F32 as numbers)."""
    from gguf import dequantize

    check_type(tensor)
    return dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)


def _byte_level(digits: bool):
    """GPT-2's byte-level pre-tokenizer, after splitting every digit apart when ``digits``."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if not digits:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


#: Qwen2's split (its tokenizer.json and transformers' ``Qwen2Tokenizer``; Qwen3 uses it too):
#: contractions, letters with one leading non-letter, single digits, punctuation runs, newlines.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _qwen2_split():
    """Qwen2's regex split, then the byte-level mapping without GPT-2's own split."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


#: llama.cpp's pre-tokenizer names (``tokenizer.ggml.pre``) for byte-level BPE vocabularies
#: puma reads, and the pre-tokenizer each stands for (as in the model's original tokenizer.json:
#: SmolLM's splits digits one by one before GPT-2's byte-level split; Qwen2's is its own regex).
BPE_PRE_TOKENIZERS = {
    "default": lambda: _byte_level(digits=False),
    "gpt-2": lambda: _byte_level(digits=False),
    "smollm": lambda: _byte_level(digits=True),
    "qwen2": _qwen2_split,
}

#: GGUF token type of control tokens (``<|im_start|>``, ...): matched whole in text, never split.
CONTROL = 3


def _bpe_tokenizer(info: dict):
    """A byte-level BPE tokenizer from the GGUF's own tokens, merges and pre-tokenizer name;
    BOS prepended only when the file says so (``tokenizer.ggml.add_bos_token``); its chat
    template kept. None (with a warning) for a pre-tokenizer puma does not know."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    pre = info.get("pre", "default")
    if pre not in BPE_PRE_TOKENIZERS:
        log.warning(
            "GGUF BPE pre-tokenizer %r is not supported (%s): text needs token ids instead",
            pre,
            ", ".join(sorted(BPE_PRE_TOKENIZERS)),
        )
        return None
    tokens = info["tokens"]
    merges = [tuple(m.split(" ", 1)) for m in info["merges"]]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = BPE_PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    kinds = info.get("token_type", [])
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds) if k == CONTROL]
    )
    special = _special_tokens(info, tokens)
    if info.get("add_bos_token") and "bos_token" in special:
        bos = special["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, info["bos_token_id"])]
        )
    with _quiet_transformers():
        return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=info.get("chat_template"), **special)


def _special_tokens(info: dict, tokens: list) -> dict:
    """``bos_token`` and friends by the ids the file names."""
    special = {}
    for key, arg in (
        ("bos_token_id", "bos_token"),
        ("eos_token_id", "eos_token"),
        ("unk_token_id", "unk_token"),
        ("pad_token_id", "pad_token"),
    ):
        idx = info.get(key)
        if idx is not None and 0 <= idx < len(tokens):
            special[arg] = tokens[idx]
    return special


def _gguf_tokenizer(reader):
    """The file's tokenizer: SentencePiece (``tokenizer.ggml.model = llama``) or byte-level BPE
    (``gpt2``); None if it has neither."""
    keys = {
        "tokenizer.ggml.model": "tokenizer_type",
        "tokenizer.ggml.tokens": "tokens",
        "tokenizer.ggml.scores": "scores",
        "tokenizer.ggml.token_type": "token_type",
        "tokenizer.ggml.merges": "merges",
        "tokenizer.ggml.bos_token_id": "bos_token_id",
        "tokenizer.ggml.eos_token_id": "eos_token_id",
        "tokenizer.ggml.unknown_token_id": "unk_token_id",
        "tokenizer.ggml.padding_token_id": "pad_token_id",
        "tokenizer.ggml.add_space_prefix": "add_prefix_space",
        "tokenizer.ggml.add_bos_token": "add_bos_token",
        "tokenizer.ggml.pre": "pre",
        "tokenizer.chat_template": "chat_template",
    }
    info = {name: _gguf_field(reader, key) for key, name in keys.items() if key in reader.fields}
    if "tokens" not in info:
        return None
    if info.get("tokenizer_type") == "gpt2":
        return _bpe_tokenizer(info)
    if info.get("tokenizer_type") != "llama":
        return None
    return _sentencepiece_tokenizer(info)


#: GGUF token types (llama.cpp's ``llama_token_type``) besides :data:`CONTROL`.
NORMAL, USER_DEFINED = 1, 4


def sentencepiece_merges(tokens: list, scores: list, kinds: list) -> list[tuple[str, str]]:
    """A SentencePiece BPE vocabulary's merges in priority order: every split of a normal piece
    into two normal pieces, the pieces of higher score first (SentencePiece merges the adjacent
    pair whose union scores best), a piece's splits by their halves' ids."""
    normal = {t: (s, i) for i, (t, s, k) in enumerate(zip(tokens, scores, kinds)) if k == NORMAL}
    ranked = []
    for piece, (score, _) in normal.items():
        for cut in range(1, len(piece)):
            left, right = normal.get(piece[:cut]), normal.get(piece[cut:])
            if left is not None and right is not None:
                ranked.append((-score, left[1], right[1], piece[:cut], piece[cut:]))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_tokenizer(info: dict):
    """A SentencePiece (BPE, byte fallback) tokenizer from the GGUF's own tokens, scores and
    types, as llama.cpp tokenizes: control and user-defined tokens (Gemma's newline and space
    runs, its HTML tags) matched whole in the text, the rest split at them, spaces written as
    "▁", with a "▁" in front of each such span when the file says ``add_space_prefix`` (llama.cpp's
    default), then BPE merges by score. BOS as ``add_bos_token`` says (default: added)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens, scores = info["tokens"], info.get("scores") or [0.0] * len(info["tokens"])
    kinds = info.get("token_type") or [NORMAL] * len(tokens)
    unk = info.get("unk_token_id")
    backend = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=sentencepiece_merges(tokens, scores, kinds),
            unk_token=tokens[unk] if unk is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = info.get("add_prefix_space", True)
    escape = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), escape]) if prefix else escape
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    backend.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, kinds) if k == USER_DEFINED]
    )
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, kinds) if k == CONTROL]
    )
    special = _special_tokens(info, tokens)
    if info.get("add_bos_token", True) and "bos_token" in special:
        bos = special["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, info["bos_token_id"])]
        )
    with _quiet_transformers():
        return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=info.get("chat_template"), **special)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' conversion chatter (warnings and progress bars) for a moment."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _reader(path: str):
    """The ``gguf`` package's reader on a plain array view of the file's memory map: the same
    fields and tensors (still memory-mapped), parsed 3x faster (on a 262 144-token vocabulary,
    5 s instead of 17: its many small slices skip ``np.memmap``'s per-slice bookkeeping)."""
    from gguf import GGUFReader

    class Reader(GGUFReader):
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray)

    return Reader(path)


def read(path: str, families: dict[str, Family]) -> tuple[str, object, dict[str, TensorRef], object]:
    """A GGUF file's family (its architecture, one of ``families`` that has GGUF names), config,
    tensors under HF names (read on demand from the memory map) and tokenizer (None if it has
    none puma reads).

    Parsed once per process and file version (path, size, modification time): the client and
    the owner both read it, and on SmolLM2's file the parse and the tokenizer take about 2.4 s
    each time. The tensors stay memory-mapped; their dict is the caller's own."""
    try:
        stat = os.stat(path)
    except OSError as err:
        raise PumaError(f"{path}: cannot read ({err.strerror})") from None
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, tuple(sorted(families)))
    if key not in _PARSED:
        while len(_PARSED) >= _PARSED_FILES:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = _read(path, families)
    arch, config, tensors, tokenizer = _PARSED[key]
    return arch, config, dict(tensors), tokenizer


#: :func:`read`'s parsed files: (real path, size, modification time, family names) -> result,
#: at most _PARSED_FILES of them (the oldest dropped first).
_PARSED: dict[tuple, tuple] = {}
_PARSED_FILES = 4


def _read(path: str, families: dict[str, Family]) -> tuple[str, object, dict[str, TensorRef], object]:
    try:
        reader = _reader(path)
    except Exception as err:  # the reader raises assorted errors on a corrupt file
        raise PumaError(f"{path}: not a readable GGUF file ({err})") from err
    arch = _gguf_field(reader, "general.architecture")
    readable = sorted(name for name, fam in families.items() if fam.gguf_names)
    if arch not in readable:
        raise PumaError(f"{path}: GGUF architecture {arch!r} is not supported (only {', '.join(map(repr, readable))})")
    family = families[arch]
    config = _gguf_config(reader, arch, family.config_cls)
    return arch, config, _gguf_tensors(reader, family, config), _gguf_tokenizer(reader)


def _gguf_config(reader, arch: str, config_cls):
    """The config from the file's ``<arch>.*`` metadata (llama.cpp's keys); a config with a
    ``head_dim`` field takes it from the key length."""

    def meta(key, default=None):
        return _gguf_field(reader, f"{arch}.{key}", default)

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    vocab = meta("vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens", []))
    fields = {
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "max_position_embeddings": int(meta("context_length", 2048)),
        "rms_norm_eps": float(np.float32(meta("attention.layer_norm_rms_epsilon", 1e-6))),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
    }
    if "head_dim" in {f.name for f in dataclasses.fields(config_cls)}:
        fields["head_dim"] = int(meta("attention.key_length", hidden // heads))
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in reader.fields:
            fields[key] = int(_gguf_field(reader, f"tokenizer.ggml.{key}"))
    if hasattr(config_cls, "gguf_fields"):  # what the family reads besides the shared keys
        fields.update(config_cls.gguf_fields(meta, fields))
    return config_cls(**fields)
