"""Secure sessions: programs compiled for SPU and run by computing parties on shares.

:class:`SecureSession` is the driver. It plays the model owner once (sharing the weights to the
parties at :meth:`load_params`) and the client on every run (sharing inputs, reconstructing the
revealed outputs). The parties are reached through a :class:`Mesh`, whose subclasses put them in
threads (``sim``), OS processes (``nodes``) or Ray actors (``ray``).

Names at the parties: weights ``p:<flax path>``, client inputs ``i:<name>`` (secret) and
``u:<name>`` (public), outputs ``o:<n>``, state ``s:<slot>:<n>``. A program is compiled once per
input signature; its code does not depend on names, so one compiled program serves every state
slot, and a stage program serves every layer it is bound to (``bind``).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import logging
import os
import time

import jax
import numpy as np
import spu
import spu.libspu as libspu

from puma import progress
from puma.errors import PumaError
from puma.program import Program
from puma.runtime import budget, compile_cache, memory, messages, programs, sharing
from puma.runtime.base import Session
from puma.runtime.config import ProtocolConfig
from puma.runtime.params import flatten
from puma.runtime.profiles import RunProfile
from puma.runtime.roles import CHUNK_BYTES, Client, ModelOwner, OwnerSpec, PartyShares, share_function

log = logging.getLogger(__name__)


class Mesh(abc.ABC):
    """The computing parties of one session, wherever they run: every operation is a command of
    :data:`puma.runtime.commands.COMMANDS`, given to all parties by :meth:`call`.

    A party failure raises :class:`PumaError` naming it.
    """

    backend: str = ""
    world_size: int = 0
    #: Per party, what it reported when the mesh opened (None: the parties are this process).
    hosts: list[tuple[str, int]] | None = None  # (host name, available bytes)
    heaps: list[bool] | None = None  # keeps freed memory (puma.runtime.memory)
    #: The parties build and compile their own programs from specs (``nodes``): the driver is
    #: a client there, never the operator that installs code.
    remote_compile: bool = False

    @abc.abstractmethod
    def call(self, command: str, per_party: list[dict]) -> list:
        """Give party r ``command`` with the arguments ``per_party[r]`` and return every
        party's reply. The list is emptied as the arguments are handed over, so shares are freed
        here once their party holds them."""

    def broadcast(self, command: str, **kwargs) -> list:
        """:meth:`call` with the same arguments for every party."""
        return self.call(command, [dict(kwargs) for _ in range(self.world_size)])

    def deliver(self, bundles: list[PartyShares]) -> None:
        """Give party r ``bundles[r]`` (and nothing else) as the operator's weights or inputs;
        the list is emptied as the bundles are handed over."""
        per_party = [{"bundle": b} for b in bundles]
        bundles.clear()
        self.call("weights", per_party)

    def open_owner(self, spec: OwnerSpec, runtime_config: bytes) -> None:
        """Start the model owner: it opens its weights lazily and shares nothing yet.

        Here the owner runs in the driver's process, reading one tensor at a time; meshes with
        separate processes (Ray) run it elsewhere.
        """
        config = libspu.RuntimeConfig()
        config.ParseFromString(runtime_config)
        self._owner = ModelOwner.from_spec(spec)
        self._share = share_function(config, self.world_size)

    def owner_share(self, names: list[str] | None = None, chunk_bytes: int = CHUNK_BYTES) -> int:
        """Have the owner share weights ``names`` (flat paths; default all) to the parties, chunk
        by chunk (``chunk_bytes=0``: tensor by tensor). Returns the bytes of shares moved."""
        return deliver_weights(self, self._owner, self._share, names, chunk_bytes)

    def close_owner(self) -> int:
        """Stop the model owner; returns its process's peak RSS when it ran in a process of its
        own (0 here: it is this process)."""
        self._owner = None
        return 0

    def owner_peak_rss(self) -> int:
        """Peak RSS of a running owner in a process of its own (0 here: it is this process)."""
        return 0

    def install(self, key: str, name: str, code: bytes) -> None:
        """Make compiled program ``code`` available at every party under ``key``."""
        self.broadcast("install", key=key, name=name, code=code)

    def run(self, key: str, inputs: list[str], outputs: list[str]) -> list[RunProfile | None]:
        """Run program ``key`` on every party at once, binding inputs/outputs by name."""
        return self.broadcast("run", key=key, inputs=inputs, outputs=outputs)

    def collect(self, names: list[str]) -> list[PartyShares]:
        """Every party's shares of ``names`` (for the client to reconstruct)."""
        return self.broadcast("collect", names=names)

    def drop(self, names: list[str]) -> None:
        """Delete ``names`` at every party."""
        self.broadcast("drop", names=names)

    def store(self, names: list[str], directory: str) -> list[int]:
        """Every party writes its own shares of ``names`` to ``directory`` on its own disk
        (bytes written per party)."""
        return self.broadcast("store", names=names, folder=directory)

    def restore(self, names: list[str], directory: str) -> list[int]:
        """Every party loads ``names`` from its store (bytes read per party; -1 where missing)."""
        return self.broadcast("restore", names=names, folder=directory)

    def close(self) -> None:
        """Stop the parties of this session."""

    def party_hosts(self) -> list[tuple[str, int]]:
        """(host name, available bytes) per party, for the default memory budget."""
        return self.hosts or [memory.host()] * self.world_size

    def party_heaps_kept(self) -> list[bool]:
        """Per party: whether its process keeps freed memory (:mod:`puma.runtime.memory`)."""
        return self.heaps or [memory.heap_kept()] * self.world_size


def deliver_weights(
    mesh: Mesh, owner: ModelOwner, share, names: list[str] | None = None, chunk_bytes: int = CHUNK_BYTES
) -> int:
    """Share the owner's weights ``names`` (default all) with ``share`` chunk by chunk and deliver
    each chunk; returns bytes of shares."""
    total = 0
    for bundles in owner.share_chunks(share, mesh.world_size, names, chunk_bytes):
        total += sum(b.nbytes for b in bundles)
        mesh.deliver(bundles)
    return total


class SecureSession(Session):
    """Runs programs under MPC on a :class:`Mesh` with the given protocol settings."""

    def __init__(self, mesh: Mesh, protocol: ProtocolConfig, in_process: bool = False, backend: str = ""):
        """``in_process``: every party lives in this process (its memory holds all their shares);
        ``backend``: the name it was opened under (default: the mesh's)."""
        super().__init__()
        self.mesh = mesh
        self.in_process = in_process
        self.protocol_config = protocol
        self.backend = backend or mesh.backend
        self.protocol = protocol.describe()
        self.world_size = mesh.world_size
        self.io = spu.Io(self.world_size, protocol.runtime_config(profile=False))
        self.client = Client(self.io, self.world_size)
        self._param_avals = None
        self._states: dict[str, object] = {}
        self._compiled: dict[tuple, _Compiled] = {}
        self._joins: dict[tuple, str] = {}  # block shapes -> installed join program
        self._installed: set[str] = set()
        self.owner_peak_rss = 0
        self.share_store: str | None = None  # per-party store folder (see use_share_store)
        self.published: str | None = None  # the model id parties serve from their stores (open_published)

    def open_published(self, model_id: str, param_avals: dict, approx: str) -> None:
        """Run on a model the owner published to the parties' own stores (``nodes``): the
        parties hold its shares and build every program themselves with the approximation set
        ``approx``; this session is a client."""
        self.published = model_id
        self.approx = approx
        self._param_avals = param_avals
        self.weights_mode = "published"

    def weight_bytes(self) -> int:
        proto = self.protocol_config
        return budget.bytes_per_weight(proto.protocol, proto.field, self.world_size if self.in_process else 1)

    def weight_hosts(self) -> list[tuple[str, int]]:
        return [memory.host()] if self.in_process else self.mesh.party_hosts()

    def describe(self) -> str:
        return f"under MPC on {self.backend} ({self.protocol})"

    # -- model owner ---------------------------------------------------------------------------

    def load_params(self, params: dict) -> None:
        """Act as the model owner here: secret-share ``params`` to the parties, once."""
        owner = ModelOwner(params)
        share = share_function(self.protocol_config.runtime_config(profile=False), self.world_size)
        self._param_avals = programs.avals(params)
        self.params_io_bytes = self._share_weights(
            lambda names: deliver_weights(self.mesh, owner, share, names), self._flat_names(list(params))
        )
        log.info(
            "shared %d weight tensors (%.1f MB of shares) to %d parties",
            len(owner.names()),
            self.params_io_bytes / 1e6,
            self.world_size,
        )

    def load_model(
        self, spec: OwnerSpec, param_avals: dict, streamed: bool, share_store: str | None = None, model_id: str = ""
    ) -> None:
        """Let the model owner share its weights to the parties itself; the driver (client)
        knows only their shapes (``param_avals``) and never holds them.

        Resident: every weight is shared now, once. ``streamed``: the owner stays ready and
        shares a stage's weights when :meth:`hold_params` asks, tensor by tensor;
        :meth:`release_params` drops them at the parties (and ``share_store`` keeps them, see
        :meth:`use_share_store`).
        """
        if share_store:
            if not streamed:
                raise PumaError("a share store keeps streamed weights: use it with --weights streamed or auto")
            self.use_share_store(share_store, model_id)
        self._param_avals = dict(param_avals)
        self.mesh.open_owner(spec, self.protocol_config.runtime_config(profile=False).SerializeToString())
        if streamed:
            self.weights_mode = "streamed"
            self.params_io_bytes = 0
            log.info("model owner ready to stream %s to %d parties", spec.source, self.world_size)
            return
        try:
            self.params_io_bytes = self._share_weights(self.mesh.owner_share, self._flat_names(list(param_avals)))
        finally:
            self.owner_peak_rss = self.mesh.close_owner()
        log.info(
            "model owner shared %s (%.1f MB of shares) to %d parties",
            spec.source,
            self.params_io_bytes / 1e6,
            self.world_size,
        )

    def _owner_peak_rss(self) -> int:
        return max(self.owner_peak_rss, self.mesh.owner_peak_rss())

    def _flat_names(self, keys: list[str]) -> list[str]:
        """The flat weight paths under the top-level subtrees ``keys``."""
        return programs.leaf_names("", {k: self._param_avals[k] for k in keys})

    def use_share_store(self, directory: str, model_id: str) -> None:
        """Keep streamed weight shares in per-party stores under ``directory`` (each party on
        its own disk, its own shares only): a stage's weights are shared by the owner the first
        time and read back from the stores afterwards, so repeated queries need no re-sharing.
        ``model_id`` identifies the weights by their content (:func:`puma.deploy.model_id`), so
        a changed file at the same path gets stores of its own."""
        ident = repr(
            (model_id, self.protocol_config.protocol, self.protocol_config.field, self.protocol_config.fxp_bits)
        )
        self.share_store = os.path.join(directory, hashlib.sha1(ident.encode()).hexdigest()[:16])

    def hold_params(self, keys: list[str]) -> None:
        if self.weights_mode != "streamed" or self.published or not keys:
            return  # published models: the parties load from their own stores what a run needs
        start = time.perf_counter()
        names = self._flat_names(keys)
        at_parties = [ModelOwner.PREFIX + n for n in names]
        if self.share_store is not None:
            read = self.mesh.restore(at_parties, self.share_store)
            if min(read) >= 0:
                for report in self._reports:
                    report.add_store(sum(read), time.perf_counter() - start)
                return
        nbytes = self._share_weights(lambda group: self.mesh.owner_share(group, chunk_bytes=0), names)
        if self.share_store is not None:
            self.mesh.store(at_parties, self.share_store)
        self._add_weights(nbytes, time.perf_counter() - start)

    def _share_weights(self, send, names: list[str]) -> int:
        """Have the owner share weights ``names`` with ``send`` (names -> bytes moved); a weight
        that travels as row blocks (:func:`puma.runtime.sharing.row_blocks`) is sent on its own
        and joined at the parties before the next one, so a party holds at most two copies of
        one big weight. Returns the bytes moved."""
        avals = flatten(self._param_avals)
        total, group = 0, []
        for name in names:
            shape = tuple(avals[name].shape)
            blocks = sharing.row_blocks(shape, self.protocol_config.field)
            if not blocks:
                group.append(name)
                continue
            if group:
                total += send(group)
                group = []
            total += send([name])
            self._join(name, shape, blocks)
        return total + (send(group) if group else 0)

    def _join(self, name: str, shape: tuple[int, ...], blocks: list[tuple[int, int]]) -> None:
        """Concatenate the row blocks of weight ``name`` at the parties (local: no messages)."""
        parts = [ModelOwner.PREFIX + sharing.block_name(name, k) for k in range(len(blocks))]
        avals = [jax.ShapeDtypeStruct((stop - start, *shape[1:]), np.float32) for start, stop in blocks]
        signature = tuple(a.shape for a in avals)
        if signature not in self._joins:
            self._joins[signature], _ = self._install(
                "join_blocks",
                lambda *xs: jax.numpy.concatenate(xs, axis=0),
                avals,
                [libspu.Visibility.VIS_SECRET] * len(avals),
            )
        self.mesh.run(self._joins[signature], parts, [ModelOwner.PREFIX + name])
        self.mesh.drop(parts)

    def _install(self, name: str, fn, flat_args: list, visibility: list) -> tuple[str, bytes]:
        """Compile ``fn`` on ``flat_args`` (with their visibilities) for SPU and install it at the
        parties once (as the operator of a ``sim`` or ``ray`` session); its key and code. The code
        comes from the user's compile cache when an earlier process compiled the same program."""
        return self._install_keyed(name, fn, flat_args, visibility)[:2]

    def _install_keyed(self, name: str, fn, flat_args: list, visibility: list) -> tuple[str, bytes, str | None]:
        """:meth:`_install` and the code's compile cache entry (None without a cache)."""
        if self.mesh.remote_compile:
            raise PumaError(
                f"program {name} is not one the parties build themselves: programs of your own run on "
                "the sim and ray backends only"
            )
        options = self.protocol_config.compiler_options()
        code, entry = programs.compile_keyed(name, fn, flat_args, visibility, options, compile_cache.user_folder())
        return self._put(name, code), code, entry

    def _put(self, name: str, code: bytes) -> str:
        """Install ``code`` at the parties once; its key."""
        key = programs.code_key(name, code)
        if key not in self._installed:
            self.mesh.install(key, name, code)
            self._installed.add(key)
        return key

    def _from_index(self, program: Program, index: str, avals: tuple) -> _Compiled | None:
        """A built-in program from the compile cache's index without tracing it (see
        :mod:`puma.runtime.compile_cache`), or None."""
        folder = compile_cache.user_folder()
        doc = compile_cache.read_index(folder, index)
        if doc is None:
            return None
        try:
            lowered = programs.from_signature(doc["program"], *avals)
        except (KeyError, TypeError, ValueError) as err:
            compile_cache.drop_index(folder, index, f"unusable ({err})")
            return None
        code = compile_cache.read_code(folder, str(doc.get("code")))
        if code is None:
            compile_cache.drop_index(folder, index, "pointing at a missing code entry")
            return None
        compile_cache.stats["index"] += 1
        log.info("compile cache hit: %s without tracing (%d KB of pphlo)", program.name, len(code) // 1024)
        return _Compiled(self._put(program.name, code), lowered)

    def release_params(self, keys: list[str]) -> None:
        if self.weights_mode == "streamed" and not self.published and keys:
            self.mesh.drop([ModelOwner.PREFIX + n for n in self._flat_names(keys)])

    def table_row_blocks(self, shape: tuple[int, ...]) -> list[tuple[int, int]]:
        return [] if self.published else sharing.row_blocks(shape, self.protocol_config.field)

    def table_blocks(self, name: str) -> list[tuple[int, int]]:
        if self.weights_mode != "streamed" or self.published or not name:
            return []
        shape = tuple(flatten(self._param_avals)[name].shape)
        blocks = self.table_row_blocks(shape)
        for k, (start, stop) in enumerate(blocks):  # the owner shares block k as weight name#k
            self._param_avals[sharing.block_name(name, k)] = jax.ShapeDtypeStruct(
                (stop - start, *shape[1:]), np.float32
            )
        return blocks

    # -- runs ----------------------------------------------------------------------------------

    def _compile(self, program: Program, param_avals, state_avals, secret: dict, public: dict) -> _Compiled:
        """Lower ``program`` for these input shapes (and, as the operator, compile and install
        it), once per signature."""
        cache_key = program.cache_key(param_avals, state_avals, programs.avals(secret), programs.avals(public))
        if cache_key in self._compiled:
            return self._compiled[cache_key]
        started = time.perf_counter()
        avals = (param_avals, state_avals, programs.avals(secret), programs.avals(public))
        index = None
        if program.builtin and not self.published and not self.mesh.remote_compile and compile_cache.user_folder():
            described = repr((cache_key, program.spec))
            index = compile_cache.index_key(described, self.protocol_config.compiler_options())
            compiled = self._from_index(program, index, avals)
            if compiled is not None:
                self._compiled[cache_key] = compiled
                self._compile_s += time.perf_counter() - started
                return compiled
        lowered = programs.lower(program, *avals)
        key = None
        if not self.published:
            progress.status("compiling %s for SPU (once per input shape)", program.name)
            key, code, entry = self._install_keyed(program.name, lowered.fn, lowered.flat_args, lowered.visibility)
            log.info("compiled %s (%d inputs, %d KB of pphlo)", program.name, len(lowered.inputs), len(code) // 1024)
            signature = programs.signature_doc(lowered)
            if index is not None and entry is not None and signature is not None:
                compile_cache.write_index(compile_cache.user_folder(), index, entry, signature)
        compiled = _Compiled(key, lowered)
        self._compiled[cache_key] = compiled
        self._compile_s += time.perf_counter() - started
        return compiled

    def _run(self, program, secret, public, state, bind):
        if self._param_avals is None:
            raise PumaError("no model loaded in this session")
        slot_avals = self._states.get(state, {}) if state else {}
        param_avals = program.select_params(self._param_avals, bind)
        state_avals = program.select_state(slot_avals, bind)
        compiled = self._compile(program, param_avals, state_avals, secret, public)
        lowered = compiled.lowered
        slot = state or "-"
        if lowered.state_avals is not None and not state:
            raise PumaError(f"program {program.name} keeps state: run it with a state slot")
        bundles = self.client.share(
            {f"i:{k}": v for k, v in programs.flat_named(secret).items()},
            {f"u:{k}": v for k, v in programs.flat_named(public).items()},
        )
        upload = sum(b.nbytes for b in bundles)
        reveal_names = [f"o:{i}" for i in range(lowered.reveal_count)]
        if self.published:
            profiles = self._run_task(program, bundles, secret, public, slot, bind)
            shares = self.mesh.call("outputs", [{"names": reveal_names} for _ in range(self.world_size)])
        else:
            inputs = [programs.bound(kind, n, slot, bind) for kind, n in lowered.inputs]
            outputs = [programs.bound(kind, n, slot, bind) for kind, n in lowered.outputs]
            self.mesh.deliver(bundles)
            profiles = self.mesh.run(compiled.key, inputs, outputs)
            shares = self.mesh.collect(reveal_names)
            self.mesh.drop([n for n in inputs if n[:2] in ("i:", "u:")] + reveal_names)
        plain = self.client.reconstruct(shares)
        reveal = jax.tree_util.tree_unflatten(lowered.reveal_tree, [plain[n] for n in reveal_names])
        if lowered.state_avals is not None:
            current = self._states.setdefault(state, {})
            for k, v in lowered.state_avals.items():
                current[bind.get(k, k)] = v
        return reveal, profiles, (upload, sum(b.nbytes for b in shares))

    def _run_task(self, program: Program, bundles: list, secret: dict, public: dict, slot: str, bind: dict) -> list:
        """A client's run on a published model: its input shares, then the program's spec; each
        party builds and compiles the program itself (its compile time is reported apart)."""
        if program.spec is None:
            raise PumaError(
                f"program {program.name} is not one the parties build themselves: programs of your own run on "
                "the sim and ray backends only"
            )
        self.mesh.call("inputs", [{"bundle": b} for b in bundles])
        bundles.clear()
        task = {
            "model": self.published,
            "approx": self.approx,
            "spec": [program.spec[0], program.spec[1]],
            "slot": slot,
            "bind": bind,
            "secret": programs.avals(secret),
            "public": programs.avals(public),
        }
        replies = self.mesh.call("run_task", [dict(task) for _ in range(self.world_size)])
        self._compile_s += max(r["compile_s"] for r in replies)
        return [messages.get_profile(r["profile"]) if isinstance(r["profile"], dict) else None for r in replies]

    def free(self, state: str) -> None:
        avals = self._states.pop(state, None)
        if avals is None:
            return
        if self.published:
            self.mesh.broadcast("free", slot=state)
        else:
            self.mesh.drop(programs.leaf_names(f"s:{state}:", avals))

    def close(self) -> None:
        if self.weights_mode == "streamed":
            self.mesh.close_owner()
        self.mesh.close()


@dataclasses.dataclass
class _Compiled:
    key: str | None  # the installed code's key (None: the parties compile it themselves)
    lowered: programs.Lowered
