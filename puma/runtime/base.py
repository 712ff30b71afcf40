"""The :class:`Session` interface every backend implements, and the plaintext backend.

A session holds one model's parameters and runs :class:`puma.program.Program` objects on them.
Task code (generation, embeddings, classification) talks only to this interface, so the same
loop runs in plaintext and under MPC. State slots hold values that stay inside the backend
between runs (for secure backends: secret-shared at the computing parties).
"""

from __future__ import annotations

import abc
import contextlib
import time
from typing import Iterator

import jax
import numpy as np

from puma.program import Program
from puma.runtime.cost import CostReport


class Session(abc.ABC):
    """Runs programs on one model's parameters; accumulates a :class:`CostReport`."""

    backend: str = ""
    protocol: str = "none"
    world_size: int = 0

    def __init__(self):
        self._reports: list[CostReport] = []
        self._compile_s = 0.0  # compile time spent inside the current run (excluded from its wall time)

    @abc.abstractmethod
    def load_params(self, params: dict) -> None:
        """Give the session the model owner's parameters (secure backends: as shares)."""

    @abc.abstractmethod
    def _run(self, program: Program, secret: dict, public: dict, state: str | None) -> tuple[dict, list, int]:
        """Run once; return (revealed outputs, per-party profiles, io bytes)."""

    @abc.abstractmethod
    def free(self, state: str) -> None:
        """Drop a state slot."""

    def close(self) -> None:
        """Release the backend's resources."""

    def run(
        self, program: Program, secret: dict | None = None, public: dict | None = None, state: str | None = None
    ) -> dict:
        """Run ``program``; the client gets the revealed outputs as numpy arrays.

        ``state`` names a slot: its current contents are passed as the program's ``state`` and
        the program's new state replaces them.
        """
        start = time.perf_counter()
        self._compile_s = 0.0
        reveal, profiles, io_bytes = self._run(program, dict(secret or {}), dict(public or {}), state)
        elapsed = time.perf_counter() - start - self._compile_s
        for report in self._reports:
            report.add_run(program.name, profiles, elapsed, io_bytes, self._compile_s)
        return reveal

    @contextlib.contextmanager
    def measure(self) -> Iterator[CostReport]:
        """Collect the cost of every run made inside the ``with`` block."""
        report = CostReport.empty(self.backend, self.protocol, self.world_size)
        self._reports.append(report)
        try:
            yield report
        finally:
            self._reports = [r for r in self._reports if r is not report]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PlaintextSession(Session):
    """Runs programs with ``jax.jit`` in this process: the reference every backend is checked against."""

    backend = "plaintext"

    def __init__(self):
        super().__init__()
        self._params: dict | None = None
        self._states: dict[str, dict] = {}
        self._compiled: dict[tuple, object] = {}

    def load_params(self, params: dict) -> None:
        self._params = params

    def _run(self, program, secret, public, state):
        current = self._states.get(state, {}) if state else {}
        key = program.cache_key(self._params, current, secret, public)
        if key not in self._compiled:
            start = time.perf_counter()
            self._compiled[key] = jax.jit(program.fn).lower(self._params, current, secret, public).compile()
            self._compile_s += time.perf_counter() - start
        reveal, new_state = self._compiled[key](self._params, current, secret, public)
        if state and new_state:
            self._states[state] = new_state
        return jax.tree_util.tree_map(np.asarray, reveal), [], 0

    def free(self, state: str) -> None:
        self._states.pop(state, None)
