"""Secure sessions: programs compiled for SPU and run by computing parties on shares.

:class:`SecureSession` is the driver. It plays the model owner once (sharing the weights to the
parties at :meth:`load_params`) and the client on every run (sharing inputs, reconstructing the
revealed outputs). The parties are reached through a :class:`Mesh`, whose subclasses put them in
threads (``sim``), OS processes (``nodes``) or Ray actors (``ray``).

Names at the parties: weights ``p:<flax path>``, client inputs ``i:<name>`` (secret) and
``u:<name>`` (public), outputs ``o:<n>``, state ``s:<slot>:<n>``. A program is compiled once per
input signature; its code does not depend on names, so one compiled program serves every state
slot.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import logging
import time

import jax
import numpy as np
import spu
import spu.libspu as libspu
from spu.utils import frontend as spu_fe

from puma.errors import PumaError
from puma.program import Program
from puma.runtime.base import Session
from puma.runtime.config import ProtocolConfig
from puma.runtime.cost import RunProfile
from puma.runtime.roles import Client, ModelOwner, OwnerSpec, PartyShares

log = logging.getLogger(__name__)


class Mesh(abc.ABC):
    """The computing parties of one session, wherever they run.

    Every method acts on all parties; a party failure raises :class:`PumaError` naming it.
    """

    backend: str = ""
    world_size: int = 0

    @abc.abstractmethod
    def deliver(self, bundles: list[PartyShares]) -> None:
        """Give party r ``bundles[r]`` (and nothing else)."""

    def owner_upload(self, spec: OwnerSpec, runtime_config: bytes) -> int:
        """Have the model owner load its weights and share them to the parties.

        Here the owner runs in the driver's process and its plaintext weights are dropped once
        shared; meshes with separate processes (Ray) run it elsewhere. Returns the bytes of
        shares moved.
        """
        config = libspu.RuntimeConfig()
        config.ParseFromString(runtime_config)
        return deliver_weights(self, ModelOwner.from_spec(spec), spu.Io(self.world_size, config))

    @abc.abstractmethod
    def install(self, key: str, name: str, code: bytes) -> None:
        """Make compiled program ``code`` available at every party under ``key``."""

    @abc.abstractmethod
    def run(self, key: str, inputs: list[str], outputs: list[str]) -> list[RunProfile | None]:
        """Run program ``key`` on every party at once, binding inputs/outputs by name."""

    @abc.abstractmethod
    def collect(self, names: list[str]) -> list[PartyShares]:
        """Every party's shares of ``names`` (for the client to reconstruct)."""

    @abc.abstractmethod
    def drop(self, names: list[str]) -> None:
        """Delete ``names`` at every party."""

    def close(self) -> None:
        """Stop the parties of this session."""


def deliver_weights(mesh: Mesh, owner: ModelOwner, io: spu.Io) -> int:
    """Share the owner's weights chunk by chunk and deliver each chunk; returns bytes of shares."""
    total = 0
    for bundles in owner.share_chunks(io, mesh.world_size):
        mesh.deliver(bundles)
        total += sum(b.nbytes for b in bundles)
    return total


@dataclasses.dataclass
class _Compiled:
    key: str
    inputs: list[str]  # names with "{slot}" placeholders for state
    outputs: list[str]
    reveal_tree: object
    reveal_count: int
    state_avals: object  # pytree of ShapeDtypeStruct for the new state, or None


def _avals(tree):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype), tree
    )


def _leaf_names(prefix: str, tree) -> list[str]:
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [prefix + "/".join(_key_str(k) for k in path) for path, _ in paths]


def _key_str(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


class SecureSession(Session):
    """Runs programs under MPC on a :class:`Mesh` with the given protocol settings."""

    def __init__(self, mesh: Mesh, protocol: ProtocolConfig):
        super().__init__()
        self.mesh = mesh
        self.protocol_config = protocol
        self.backend = mesh.backend
        self.protocol = protocol.describe()
        self.world_size = mesh.world_size
        self.io = spu.Io(self.world_size, protocol.runtime_config(profile=False))
        self.client = Client(self.io, self.world_size)
        self._param_avals = None
        self._states: dict[str, object] = {}
        self._compiled: dict[tuple, _Compiled] = {}
        self._installed: set[str] = set()

    # -- model owner ---------------------------------------------------------------------------

    def load_params(self, params: dict) -> None:
        """Act as the model owner here: secret-share ``params`` to the parties, once."""
        owner = ModelOwner(params)
        self.params_io_bytes = deliver_weights(self.mesh, owner, self.io)
        self._param_avals = _avals(params)
        log.info(
            "shared %d weight tensors (%.1f MB of shares) to %d parties",
            len(owner.names()),
            self.params_io_bytes / 1e6,
            self.world_size,
        )

    def load_from_owner(self, spec: OwnerSpec, param_avals: dict) -> None:
        """Let the model owner share its weights to the parties itself; the driver (client)
        knows only their shapes (``param_avals``) and never holds them."""
        self.params_io_bytes = self.mesh.owner_upload(
            spec, self.protocol_config.runtime_config(profile=False).SerializeToString()
        )
        self._param_avals = param_avals
        log.info(
            "model owner shared %s (%.1f MB of shares) to %d parties",
            spec.source,
            self.params_io_bytes / 1e6,
            self.world_size,
        )

    # -- runs ----------------------------------------------------------------------------------

    def _compile(self, program: Program, state_avals, secret: dict, public: dict) -> _Compiled:
        cache_key = program.cache_key(self._param_avals, state_avals, _avals(secret), _avals(public))
        if cache_key in self._compiled:
            return self._compiled[cache_key]
        if self._param_avals is None:
            raise PumaError("no model loaded in this session")
        started = time.perf_counter()
        args = (self._param_avals, state_avals, _avals(secret), _avals(public))
        flat_args, in_tree = jax.tree_util.tree_flatten(args)
        reveal_avals, new_state_avals = jax.eval_shape(program.fn, *args)
        reveal_leaves, reveal_tree = jax.tree_util.tree_flatten(reveal_avals)

        def flat_fn(*flat):
            p, s, sec, pub = jax.tree_util.tree_unflatten(in_tree, flat)
            reveal, new_state = program.fn(p, s, sec, pub)
            return jax.tree_util.tree_leaves(reveal) + jax.tree_util.tree_leaves(new_state)

        inputs = (
            _leaf_names(ModelOwner.PREFIX, self._param_avals)
            + _leaf_names("s:{slot}:", state_avals)
            + _leaf_names("i:", secret)
            + _leaf_names("u:", public)
        )
        outputs = [f"o:{i}" for i in range(len(reveal_leaves))] + _leaf_names("s:{slot}:", new_state_avals)
        n_secret = len(jax.tree_util.tree_leaves((self._param_avals, state_avals, secret)))
        visibility = [libspu.Visibility.VIS_SECRET] * n_secret + [libspu.Visibility.VIS_PUBLIC] * (
            len(flat_args) - n_secret
        )
        executable, _ = spu_fe.compile(
            spu_fe.Kind.JAX,
            flat_fn,
            flat_args,
            {},
            [f"in{i}" for i in range(len(flat_args))],
            visibility,
            lambda outs: [f"out{i}" for i in range(len(outs))],
            copts=self.protocol_config.compiler_options(),
        )
        key = f"{program.name}-{hashlib.sha1(executable.code).hexdigest()[:12]}"
        if key not in self._installed:
            self.mesh.install(key, program.name, executable.code)
            self._installed.add(key)
        compiled = _Compiled(
            key,
            inputs,
            outputs,
            reveal_tree,
            len(reveal_leaves),
            new_state_avals if jax.tree_util.tree_leaves(new_state_avals) else None,
        )
        self._compiled[cache_key] = compiled
        self._compile_s += time.perf_counter() - started
        log.info(
            "compiled %s (%d inputs, %d outputs, %d KB of pphlo)",
            program.name,
            len(inputs),
            len(outputs),
            len(executable.code) // 1024,
        )
        return compiled

    def _run(self, program, secret, public, state):
        state_avals = self._states.get(state, {}) if state else {}
        compiled = self._compile(program, state_avals, secret, public)
        slot = state or "-"
        inputs = [n.replace("{slot}", slot) for n in compiled.inputs]
        outputs = [n.replace("{slot}", slot) for n in compiled.outputs]
        if compiled.state_avals is not None and not state:
            raise PumaError(f"program {program.name} keeps state: run it with a state slot")

        bundles = self.client.share(
            {f"i:{k}": v for k, v in _flat_named(secret).items()}, {f"u:{k}": v for k, v in _flat_named(public).items()}
        )
        self.mesh.deliver(bundles)
        profiles = self.mesh.run(compiled.key, inputs, outputs)
        reveal_names = outputs[: compiled.reveal_count]
        shares = self.mesh.collect(reveal_names)
        self.mesh.drop([n for n in inputs if n[:2] in ("i:", "u:")] + reveal_names)
        plain = self.client.reconstruct(shares)
        reveal = jax.tree_util.tree_unflatten(compiled.reveal_tree, [plain[n] for n in reveal_names])
        if compiled.state_avals is not None:
            self._states[state] = compiled.state_avals
        io_bytes = sum(b.nbytes for b in bundles) + sum(b.nbytes for b in shares)
        return reveal, profiles, io_bytes

    def free(self, state: str) -> None:
        avals = self._states.pop(state, None)
        if avals is not None:
            self.mesh.drop(_leaf_names(f"s:{state}:", avals))

    def close(self) -> None:
        self.mesh.close()


def _flat_named(tree: dict) -> dict[str, np.ndarray]:
    """{"a": x, "b": {"c": y}} -> {"a": x, "b/c": y} in the order :func:`_leaf_names` uses."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_str(k) for k in path): np.asarray(v) for path, v in leaves}
