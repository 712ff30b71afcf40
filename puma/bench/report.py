"""Benchmark output: JSON with versions, configuration and machine; resumable cell stores.

Every benchmark writes one JSON file whose ``cells`` map a cell id (for example
``"bert-base/128/puma-fast"``) to its measurement. :class:`CellStore` saves after every cell,
so an interrupted run resumes from the cells it already has instead of starting over.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import tempfile
from typing import Any, Callable

from puma.errors import PumaError

log = logging.getLogger(__name__)


def environment() -> dict:
    """Versions and machine facts that a result depends on."""
    import jax
    import numpy
    import spu

    import puma

    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    return {
        "puma": puma.__version__,
        "spu": spu.__version__,
        "jax": jax.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "machine": {"cpus": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1), "platform": platform.platform()},
    }


def profiled(cost):
    """``cost`` if every run in it was profiled per party, else ``PumaError`` (a cell must not
    store undercounted bytes; the benchmark resumes, so running it again measures the cell anew)."""
    if cost.unprofiled_runs:
        raise PumaError(
            f"{cost.unprofiled_runs} run(s) could not be profiled per party (interleaved logs); "
            "run the benchmark again: completed cells are kept"
        )
    return cost


class CellStore:
    """A JSON results file of named cells, written atomically after each new cell.

    ``resume``: falsy measures every cell; ``"uncontended"`` reuses the file's cells except
    those whose load record says other processes contended them; anything else truthy reuses
    every cell of the file. ``reused`` counts, per file (absolute path), the cells this process
    took from the file instead of measuring them (the command reports it)."""

    reused: dict[str, int] = {}

    def __init__(self, path: str, config: dict, resume: bool | str = True):
        self.path = path
        self.redo_contended = resume == "uncontended"
        self.data = {"benchmark": os.path.basename(path), "config": config, "environment": environment(), "cells": {}}
        if resume and os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old.get("config") == config:
                self.data["cells"] = old.get("cells", {})
                if "results" in old:  # summaries of suites run separately add up
                    self.data["results"] = old["results"]
                log.info("resuming %s: %d cells already measured", path, len(self.data["cells"]))
            else:
                log.info("%s was made with another configuration: starting over", path)
        self.data["started"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    @property
    def cells(self) -> dict:
        return self.data["cells"]

    def measure(self, key: str, fn: Callable[[], Any]) -> Any:
        """The cell ``key``: from the file if it was measured before (and, when resuming
        uncontended cells only, was not contended), else ``fn()`` (then saved)."""
        if self.holds(key):
            where = os.path.abspath(self.path)
            CellStore.reused[where] = CellStore.reused.get(where, 0) + 1
            return self.cells[key]
        value = fn()
        self.cells[key] = value
        self.save()
        return value

    def holds(self, key: str) -> bool:
        """Whether the cell ``key`` is there to reuse (when resuming uncontended cells only: and
        no run in it was contended); benchmarks that plan their work ask this."""
        return key in self.cells and not (self.redo_contended and _contended(self.cells[key]))

    def put(self, key: str, value: Any) -> None:
        self.cells[key] = value
        self.save()

    def save(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        self.data["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1, default=_jsonable)
        os.replace(tmp, self.path)


def _contended(cell) -> bool:
    """Whether a load record (:mod:`puma.bench.load`) anywhere in a cell says others used the
    machine (a row's cell may hold several runs, each with its own)."""
    if isinstance(cell, dict):
        load = cell.get("load")
        if isinstance(load, dict) and load.get("contended"):
            return True
        return any(_contended(value) for value in cell.values())
    if isinstance(cell, list):
        return any(_contended(value) for value in cell)
    return False


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
