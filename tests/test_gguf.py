"""GGUF tensor types: puma's reading of each against the ``gguf`` package's reference dequantizer.

Oracle: ``gguf.quants.dequantize`` applied to the raw blocks the test wrote (not to what puma
read back), for every type puma decodes. Types the package can quantize are made with
``gguf.quants.quantize`` from random values; for the k-quants, which it cannot quantize, the
blocks are random bytes with finite float16 scales (any such block is a valid one). Tolerance:
exact equality (the same float32 values).
"""

from __future__ import annotations

import numpy as np
import pytest

gguf_pkg = pytest.importorskip("gguf")

from puma.models import gguf as puma_gguf  # noqa: E402

from puma import models  # noqa: E402
from puma.errors import PumaError  # noqa: E402

T = gguf_pkg.GGMLQuantizationType
#: Byte offsets of each k-quant block's float16 scales (d, dmin), as llama.cpp lays them out.
SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
ROWS, COLS = 3, 512  # 2 k-quant super-blocks or 16 legacy blocks per row


def _raw_blocks(kind: str, rng) -> np.ndarray:
    """Data of type ``kind`` for a [ROWS, COLS] tensor as the file stores it."""
    qtype = T[kind]
    if kind not in SCALE_OFFSETS:
        return gguf_pkg.quants.quantize(rng.standard_normal((ROWS, COLS)).astype(np.float32), qtype)
    block_elems, block_bytes = gguf_pkg.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(ROWS * COLS // block_elems, block_bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[kind]:
        scales = (rng.standard_normal(blocks.shape[0]) * 0.01).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(ROWS, -1)


def test_every_decoded_type_reads_as_the_gguf_package_dequantizes(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "types.gguf")
    writer = gguf_pkg.GGUFWriter(path, "llama")
    written = {}
    for kind in puma_gguf.DECODED_TYPES:
        raw = _raw_blocks(kind, rng)
        written[kind] = raw
        writer.add_tensor(f"t.{kind}", raw, raw_dtype=T[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf_pkg.GGUFReader(path)
    read = {t.name: t for t in reader.tensors}
    for kind, raw in written.items():
        tensor = read[f"t.{kind}"]
        assert tensor.tensor_type == T[kind]
        expected = gguf_pkg.quants.dequantize(raw, T[kind]).astype(np.float32)
        assert expected.shape == (ROWS, COLS) and np.isfinite(expected).all(), kind
        got = puma_gguf.decode(tensor)
        assert got.dtype == np.float32 and got.shape == (ROWS, COLS), kind
        assert np.array_equal(got, expected), f"{kind}: max abs diff {np.max(np.abs(got - expected)):.3g}"


def _llama_header(writer):
    writer.add_uint32("llama.embedding_length", 32)
    writer.add_uint32("llama.feed_forward_length", 64)
    writer.add_uint32("llama.block_count", 1)
    writer.add_uint32("llama.attention.head_count", 4)
    writer.add_uint32("llama.vocab_size", 256)


def test_an_undecoded_type_is_one_line_naming_the_tensor_and_type(tmp_path):
    path = str(tmp_path / "iq.gguf")
    writer = gguf_pkg.GGUFWriter(path, "llama")
    _llama_header(writer)
    block_elems, block_bytes = gguf_pkg.GGML_QUANT_SIZES[T.IQ2_XXS]
    raw = np.zeros((256, 256 // block_elems * block_bytes), np.uint8)  # a [256, 256] table's blocks
    writer.add_tensor("token_embd.weight", raw, raw_dtype=T.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(PumaError) as err:
        models.load(path)
    message = str(err.value)
    assert "\n" not in message and "token_embd.weight" in message and "IQ2_XXS" in message
