"""The offline evaluation data: SST-2 dev, the TinyStories sample, WikiText-2.

The files live outside the project, in ``../shared/data`` next to the checkout (or where
``PUMA_DATA`` or a ``--data`` option points); they are never copied into the repository.
"""

from __future__ import annotations

import logging
import os
import pathlib

from puma.errors import PumaError

log = logging.getLogger(__name__)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def data_dir(path: str | None = None) -> pathlib.Path:
    """The data folder: ``path``, else ``$PUMA_DATA``, else ``../shared/data`` beside the project."""
    folder = pathlib.Path(path or os.environ.get("PUMA_DATA") or ROOT.parent / "shared" / "data")
    if not folder.is_dir():
        raise PumaError(f"data folder {folder} not found: pass --data DIR or set PUMA_DATA")
    return folder


def optional_data_dir(path: str | None, skipping: str):
    """:func:`data_dir`, or None (with a warning naming what is skipped) when there is none."""
    try:
        return data_dir(path)
    except PumaError as err:
        log.warning("%s: skipping %s", err, skipping)
        return None


def _file(folder: pathlib.Path, *parts: str) -> pathlib.Path:
    path = folder.joinpath(*parts)
    if not path.exists():
        raise PumaError(f"{path} not found in the data folder")
    return path


def sst2_dev(folder: pathlib.Path) -> tuple[list[str], list[int]]:
    """GLUE SST-2 validation: (sentences, labels) in file order."""
    sentences, labels = [], []
    lines = _file(folder, "sst2", "dev.tsv").read_text().splitlines()
    for line in lines[1:]:
        text, _, label = line.rpartition("\t")
        if text.strip():
            sentences.append(text.strip())
            labels.append(int(label))
    return sentences, labels


def tinystories(folder: pathlib.Path) -> list[str]:
    """The stories of the TinyStories sample (separated by ``<|endoftext|>``)."""
    text = _file(folder, "tinystories_sample.txt").read_text()
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()]


def wikitext2(folder: pathlib.Path, split: str = "test") -> list[str]:
    """Non-empty, non-heading lines of WikiText-2 ``split`` (test or valid)."""
    lines = _file(folder, "wikitext-2", f"{split}.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("=")]
