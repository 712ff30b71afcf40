"""The :class:`Session` interface every backend implements, and the plaintext backend.

A session holds one model's parameters and runs :class:`puma.program.Program` objects on them.
Task code (generation, embeddings, classification) and :class:`puma.api.SecureModel` talk only
to this interface, so the same code runs in plaintext and under MPC: :meth:`Session.load_model`
has the model owner's weights loaded (in plaintext: read here; under MPC: shared by the owner),
:meth:`Session.weight_bytes` and :meth:`Session.weight_hosts` size the memory budget,
:meth:`Session.describe` says where programs ran. State slots hold values that stay inside the
backend between runs (for secure backends: secret-shared at the computing parties).
"""

from __future__ import annotations

import abc
import contextlib
import time
from typing import Iterator

import jax
import numpy as np

from puma import interrupts
from puma.errors import PumaError
from puma.program import Program
from puma.runtime import memory
from puma.runtime.cost import CostReport
from puma.runtime.params import LazyParams, unflatten
from puma.runtime.roles import OwnerSpec


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
    def load_model(
        self, spec: OwnerSpec, param_avals: dict, streamed: bool, share_store: str | None = None, model_id: str = ""
    ) -> None:
        """Have the model owner's weights ``spec`` loaded (shapes ``param_avals``): all now, or,
        ``streamed``, each stage's when :meth:`hold_params` asks. ``share_store`` (secure
        backends, streamed only) keeps shares at the parties under the weights' ``model_id``."""

    @abc.abstractmethod
    def weight_bytes(self) -> int:
        """Memory one weight costs in one process of this backend."""

    def weight_hosts(self) -> list[tuple[str, int]]:
        """(host name, available bytes) per process holding weights, for the default memory budget."""
        return [memory.host()]

    @abc.abstractmethod
    def describe(self) -> str:
        """Where programs run, for people: plaintext is never to be mistaken for MPC."""

    @abc.abstractmethod
    def _run(
        self, program: Program, secret: dict, public: dict, state: str | None, bind: dict
    ) -> tuple[dict, list, tuple[int, int]]:
        """Run once; return (revealed outputs, per-party profiles, (bytes of the client's input
        shares, bytes of the output shares it received))."""

    #: "resident" (every weight held for the session) or "streamed" (a stage's weights are held
    #: only while it runs: :meth:`hold_params` / :meth:`release_params`).
    weights_mode: str = "resident"

    def hold_params(self, keys: list[str]) -> None:
        """Make the top-level weight subtrees ``keys`` available (streamed mode: fetch them)."""

    def release_params(self, keys: list[str]) -> None:
        """Let go of weight subtrees held by :meth:`hold_params` (streamed mode)."""

    def table_row_blocks(self, shape: tuple[int, ...]) -> list[tuple[int, int]]:
        """The row blocks a streamed token table of ``shape`` travels in ([]: it travels whole)."""
        return []

    def table_blocks(self, name: str) -> list[tuple[int, int]]:
        """The row blocks [start, stop) in which this run reads the token table ``name``: each
        block k is then the weight ``name#k`` for :meth:`hold_params` (streamed weights only);
        [] when the table is read whole."""
        return []

    def _owner_peak_rss(self) -> int:
        """Peak RSS of the model owner's process when it is not this one (else 0)."""
        return 0

    def _add_weights(self, nbytes: int, seconds: float) -> None:
        for report in self._reports:
            report.add_weights(nbytes, seconds)

    @abc.abstractmethod
    def free(self, state: str) -> None:
        """Drop a state slot."""

    def close(self) -> None:
        """Release the backend's resources."""

    def run(
        self,
        program: Program,
        secret: dict | None = None,
        public: dict | None = None,
        state: str | None = None,
        bind: dict | None = None,
    ) -> dict:
        """Run ``program``; the client gets the revealed outputs as numpy arrays.

        ``state`` names a slot: the entries the program reads are passed as its ``state`` and
        its new state entries are written into the slot. ``bind`` maps the program's local
        weight and state names to the session's (see :class:`puma.program.Program`).
        """
        interrupts.check()  # a signal that a finaliser swallowed stops the run at its next program
        start = time.perf_counter()
        self._compile_s = 0.0
        reveal, profiles, client_io = self._run(
            program, dict(secret or {}), dict(public or {}), state, dict(bind or {})
        )
        elapsed = time.perf_counter() - start - self._compile_s
        for report in self._reports:
            report.add_run(program.name, profiles, elapsed, client_io, self._compile_s)
        return reveal

    @contextlib.contextmanager
    def measure(self) -> Iterator[CostReport]:
        """Collect the cost of every run made inside the ``with`` block."""
        report = CostReport.empty(self.backend, self.protocol, self.world_size)
        report.weights_mode = self.weights_mode
        self._reports.append(report)
        try:
            yield report
        finally:
            report.process_peak_rss = memory.peak_rss()
            report.owner_peak_rss = self._owner_peak_rss()
            self._reports = [r for r in self._reports if r is not report]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PlaintextSession(Session):
    """Runs programs with ``jax.jit`` in this process: the reference every backend is checked against.

    With lazy weights (:meth:`load_lazy`, streamed mode) a stage's weights are read when the
    stage is held and dropped when it is released, as the secure backends stream shares.
    """

    backend = "plaintext"

    def __init__(self):
        super().__init__()
        self._params: dict | None = None
        self._lazy: LazyParams | None = None
        self._states: dict[str, dict] = {}
        self._compiled: dict[tuple, object] = {}

    def load_params(self, params: dict) -> None:
        self._params = params

    def load_model(
        self, spec: OwnerSpec, param_avals: dict, streamed: bool, share_store: str | None = None, model_id: str = ""
    ) -> None:
        """Read the weights here (plaintext plays every role): all now, or lazily when streamed."""
        if share_store:
            raise PumaError("plaintext keeps no shares: leave out --share-store")
        lazy = spec.open()
        if streamed:
            self.load_lazy(lazy)
        else:
            self.load_params(lazy.materialize())

    def weight_bytes(self) -> int:
        return 4  # float32

    def describe(self) -> str:
        return "in plaintext (no MPC: weights and inputs in the clear)"

    def load_lazy(self, lazy: LazyParams) -> None:
        """Stream weights from ``lazy``: nothing is read until a stage holds it."""
        self._lazy = lazy
        self._params = {}
        self.weights_mode = "streamed"

    def hold_params(self, keys: list[str]) -> None:
        if self._lazy is None:
            return
        start = time.perf_counter()
        for key in keys:
            names = [n for n in self._lazy.names() if n.split("/", 1)[0] == key]
            self._params[key] = unflatten({n.split("/", 1)[1]: self._lazy.get(n) for n in names})
        self._add_weights(0, time.perf_counter() - start)

    def release_params(self, keys: list[str]) -> None:
        if self._lazy is not None:
            for key in keys:
                self._params.pop(key, None)

    def _run(self, program, secret, public, state, bind):
        slot = self._states.get(state, {}) if state else {}
        params = program.select_params(self._params, bind)
        current = program.select_state(slot, bind)
        key = program.cache_key(params, current, secret, public)
        if key not in self._compiled:
            start = time.perf_counter()
            self._compiled[key] = jax.jit(program.fn).lower(params, current, secret, public).compile()
            self._compile_s += time.perf_counter() - start
        reveal, new_state = self._compiled[key](params, current, secret, public)
        jax.block_until_ready(new_state)  # a stage's state is not revealed: without this its compute
        # would run on asynchronously and be timed as the next stage's weight loading
        if state and new_state:
            slot = self._states.setdefault(state, {})
            for k, v in new_state.items():
                slot[bind.get(k, k)] = v
        return jax.tree_util.tree_map(np.asarray, reveal), [], (0, 0)

    def free(self, state: str) -> None:
        self._states.pop(state, None)
