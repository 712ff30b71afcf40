"""What a computing party does: one table of typed commands, carried by every transport.

``sim`` calls :meth:`PartyService.handle` in the party's thread, ``ray`` in its actor, ``nodes``
after decoding a frame (:mod:`puma.runtime.messages`) from a connection whose certificate says
who is calling. A command not in :data:`COMMANDS`, or one the caller's role may not give, is
refused; arguments are checked against the command's schema before its handler runs.

Roles (who may give which command is in the table, nowhere else):

- ``operator``: the driver of a ``sim`` or ``ray`` session, one trust domain that plays model
  owner and client and may install code it compiled itself. ``nodes`` never grants it.
- ``owner``: publishes a model into the party's own store (shares it alone produced: the party
  sees only its own) and removes it. It cannot read anything back.
- ``client``: runs programs the party builds itself from the model's manifest, for tasks the
  owner's policy allows, and receives only those programs' revealed outputs. No command hands
  out a computing party's weight share or runs code a client wrote. In client-server mode
  (:mod:`puma.runtime.client_server`) the client runs the second party itself, and the owner's
  party gives it ``client_manifest``: the signed manifest and nothing of a weight (the owner's
  party keeps its weights as its own private values; the client's party holds placeholders).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct
import time
from typing import Callable

from puma.errors import PumaError
from puma.manifest import view as manifest_view
from puma.runtime import compile_cache, memory, messages, programs, sharing
from puma.runtime.messages import Message, MessageError

log = logging.getLogger(__name__)

OPERATOR, OWNER, CLIENT = "operator", "owner", "client"


class LinksStale(PumaError):
    """The party's links were opened with peers that have since restarted. Links cannot be
    closed towards a dead peer (yacl ends the process trying), so the party restarts itself and
    the client tries again."""


class Retry(PumaError):
    """A party asked the client to try again shortly (it is restarting)."""


class JobEnded(PumaError):
    """A party ended the client's job: no command came within ``timeouts.job_idle_s``, so the
    parties serve the next client. A new session opens a new job."""


@dataclasses.dataclass(frozen=True)
class Command:
    """One operation: who may ask for it, its arguments (name -> kind, see :func:`decode`) and
    what it answers."""

    name: str
    roles: frozenset
    args: tuple[tuple[str, str], ...]
    reply: str = "json"
    collective: bool = False  # the parties talk to each other while it runs: give it to all at once


def _command(op: str, roles: set[str], reply: str = "json", collective: bool = False, **args: str) -> Command:
    return Command(op, frozenset(roles), tuple(args.items()), reply, collective)


#: Every command a party obeys. Kinds: json (plain JSON the handler checks), int, name, names,
#: bundle (shares), bytes (one raw buffer), avals (input shapes and dtypes).
COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        _command("hello", {OPERATOR, OWNER, CLIENT}, protocol="json", world_size="int", rank="int"),
        # the model owner: publish into the party's own store, or remove
        _command("publish", {OWNER}, manifest="json", signature="bytes"),
        _command("publish_weights", {OWNER}, model="name", bundle="bundle"),
        _command("publish_end", {OWNER}, model="name"),
        _command("unpublish", {OWNER}, model="name"),
        _command("status", {OWNER}, model="name"),
        # a client's job on a published model (nodes admit a job first: see puma.runtime.nodes)
        _command("job", {CLIENT}, model="name", ticket="json", peers="json"),
        _command("client_manifest", {CLIENT}, model="name"),
        _command("inputs", {OPERATOR, CLIENT}, bundle="bundle"),
        _command(
            "run_task",
            {OPERATOR, CLIENT},
            collective=True,
            model="name",
            approx="name",
            spec="json",
            slot="name",
            bind="json",
            secret="avals",
            public="avals",
        ),
        _command("outputs", {OPERATOR, CLIENT}, "bundle", names="names"),
        _command("free", {OPERATOR, CLIENT}, slot="name"),
        # the operator of a sim or ray session (one trust domain): weights it shares itself, code
        # it compiled itself, any name
        _command("weights", {OPERATOR}, bundle="bundle"),
        _command("install", {OPERATOR}, key="name", name="name", code="bytes"),
        _command("run", {OPERATOR}, "profile", collective=True, key="name", inputs="names", outputs="names"),
        _command("collect", {OPERATOR}, "bundle", names="names"),
        _command("drop", {OPERATOR}, names="names"),
        _command("store", {OPERATOR}, names="names", folder="json"),
        _command("restore", {OPERATOR}, names="names", folder="json"),
        _command("close", {OPERATOR, OWNER, CLIENT}),
    )
}


# -- the wire form of arguments ----------------------------------------------------------------


def encode(command: str, kwargs: dict) -> Message:
    """The frame of ``command`` with ``kwargs`` (typed values) for a party."""
    spec = COMMANDS[command]
    args, buffers = {}, []
    for name, kind in spec.args:
        args[name] = _put(kind, kwargs[name], buffers)
    return Message(command, args, buffers)


def decode(message: Message) -> tuple[Command, dict]:
    """The command of a frame and its typed arguments, each checked against the table."""
    spec = COMMANDS.get(message.op)
    if spec is None:
        raise MessageError(f"unknown command {message.op!r}")
    if set(message.args) != {name for name, _ in spec.args}:
        raise MessageError(f"{message.op}: arguments {sorted(message.args)} do not match the command's")
    return spec, {name: _get(kind, message.args[name], message.buffers, name) for name, kind in spec.args}


def encode_reply(kind: str, value) -> Message:
    buffers: list[bytes] = []
    return Message("ok", {"value": _put(kind, value, buffers)}, buffers)


def decode_reply(kind: str, message: Message):
    if message.op == "error":
        error = {"retry": Retry, "idle": JobEnded}.get(message.args.get("kind"), PumaError)
        raise error(str(message.args.get("message", "failed")))
    if message.op == "busy":
        return ("busy", message.args)
    if message.op != "ok" or "value" not in message.args:
        raise MessageError(f"unexpected reply {message.op!r}")
    return _get(kind, message.args["value"], message.buffers, "reply")


def _put(kind: str, value, buffers: list[bytes]):
    if kind == "bundle":
        return messages.put_bundle(value, buffers)
    if kind == "bytes":
        buffers.append(bytes(value))
        return len(buffers) - 1
    if kind == "profile":
        return messages.put_profile(value)
    if kind == "avals":
        return {k: [list(v.shape), str(v.dtype)] for k, v in programs.flat_named_avals(value).items()}
    if not messages.jsonable(value):
        raise MessageError(f"a {kind} argument must be plain JSON")
    return value


def _get(kind: str, value, buffers: list[bytes], what: str):
    if kind == "json":
        return value
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise MessageError(f"{what} must be an integer")
        return value
    if kind == "name":
        return messages.name(value, what)
    if kind == "names":
        return messages.names(value, what)
    if kind == "bundle":
        return messages.get_bundle(value, buffers)
    if kind == "bytes":
        return messages._buffer(buffers, value)
    if kind == "profile":
        return messages.get_profile(value)
    if kind == "avals":
        return programs.avals_from_flat(value, what)
    if kind == "none":
        return None
    raise MessageError(f"unknown argument kind {kind!r}")


# -- the party ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Compiled:
    key: str
    lowered: programs.Lowered
    seconds: float


class PartyService:
    """One computing party's operations (the table above) on its SPU runtime.

    ``open_party()`` makes the :class:`~puma.runtime.party.ComputeParty` (its links) when a
    command first needs it. ``models(manifest) -> view`` turns a published model's manifest into
    what the party builds programs from (default :func:`puma.manifest.view`: public config and
    policy, no weights); ``store`` is this party's own folder of published models (from its own
    configuration, never from a peer), and of the programs it compiled itself
    (``<store>/programs``, :mod:`puma.runtime.compile_cache`). An
    operator's ``store``/``restore`` name their folder (one trust domain). ``code_hook(code,
    rank)`` rewrites code before it is installed (``sim`` tags each party's profile).
    ``serves_clients``: the owner's party of a client-server deployment, which keeps the
    weights as its private values and hands a client's job the signed manifest.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        open_party: Callable[[], object],
        *,
        protocol=None,
        models: Callable[[dict], object] | None = None,
        store: str | None = None,
        process_log=None,
        code_hook: Callable[[bytes, int], bytes] | None = None,
        info: Callable[[], dict] | None = None,
        verify: Callable[[dict, bytes], None] | None = None,
        budget: int | None = None,
        serves_clients: bool = False,
    ):
        self.rank = rank
        self.world_size = world_size
        self.protocol = protocol  # the party's ProtocolConfig: its ring, and what it compiles with
        self._open_party = open_party
        self._party = None
        self._models_from = models or manifest_view
        self.store = store
        self.process_log = process_log
        self.code_hook = code_hook
        self._info = info or (lambda: {})
        self._verify = verify
        self.budget = budget
        self.serves_clients = serves_clients
        self.views: dict[str, object] = {}
        self.resident: dict[str, set[str]] = {}  # model id -> weight names held in the runtime
        self._compiled: dict[tuple, _Compiled] = {}
        self._slots: dict[str, dict] = {}  # client state slot -> state avals
        self._outputs: set[str] = set()  # o: names the last run left for the client
        self._publishing: dict[str, dict] = {}
        self._peers = None  # the parties' runs when the links opened

    @property
    def has_links(self) -> bool:
        """True once a command opened the party's runtime and links."""
        return self._party is not None

    @property
    def party(self):
        if self._party is None:
            self._party = self._open_party()
        return self._party

    def handle(self, roles: frozenset, command: str, kwargs: dict):
        """Run ``command`` for a caller holding ``roles``; PermissionError if none may give it."""
        spec = COMMANDS.get(command)
        if spec is None:
            raise PermissionError(f"unknown command {command!r}")
        if not roles & spec.roles:
            raise PermissionError(f"{command} is not a command a {'/'.join(sorted(roles))} may give")
        return getattr(self, f"_on_{command}")(**kwargs)

    # -- anyone -----------------------------------------------------------------------------

    def _on_hello(self, protocol: dict, world_size: int, rank: int) -> dict:
        mine = self.protocol
        asked = (protocol.get("protocol"), protocol.get("field")) if isinstance(protocol, dict) else None
        if mine is not None and (asked != (mine.protocol, mine.field) or world_size != self.world_size):
            name = self._info().get("id", f"rank {self.rank}")
            raise PumaError(
                f"party {name} runs {mine.protocol}/{mine.field} with {self.world_size} parties; "
                f"the job asked for {asked and asked[0]}/{asked and asked[1]} with {world_size}"
            )
        if rank != self.rank or world_size != self.world_size:
            raise PumaError(
                f"party rank {self.rank} of {self.world_size}: the caller expected rank {rank} of {world_size}"
            )
        host, free = memory.host()
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "host": host,
            "available": free,
            "heap_kept": memory.heap_kept(),
            **self._info(),
        }

    def _on_close(self) -> None:
        self.end_job()

    def end_job(self) -> None:
        """Forget a client's job: its inputs, outputs and state (the weights stay)."""
        if self._party is not None:
            names = [n for n in self._party.names() if n[:2] in ("i:", "u:", "o:", "s:")]
            self._party.drop(names)
        self._slots.clear()
        self._outputs.clear()

    # -- the owner: publishing into this party's store -----------------------------------------

    def _model_dir(self, model: str) -> str:
        if self.store is None:
            raise PumaError(f"party rank {self.rank} keeps no store: models cannot be published to it")
        if os.path.normpath(model).split(os.sep)[0] == compile_cache.FOLDER:
            raise PumaError(f"{model!r} names party rank {self.rank}'s compile cache, not a model")
        return os.path.join(self.store, model)

    def _on_publish(self, manifest: dict, signature: bytes) -> dict:
        if self._verify is not None:
            self._verify(manifest, signature)  # PermissionError unless the owner signed it
        view = self._view_of(manifest)
        model = view.model_id
        folder = self._model_dir(model)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(os.path.join(folder, "weights"))
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump({"manifest": manifest, "signature": signature.hex()}, f)
        self._publishing[model] = {"assembler": {}, "bytes": 0}
        self.views.pop(model, None)
        self._drop_model(model)
        return {"model": model}

    def _on_publish_weights(self, model: str, bundle) -> dict:
        state = self._publishing.get(model)
        if state is None:
            raise PumaError(f"model {model} is not being published: send publish first")
        if bundle.rank != self.rank:
            raise PumaError(f"party rank {self.rank} was handed rank {bundle.rank}'s shares")
        for name, piece in bundle.values.items():
            if not name.startswith("p:") or not isinstance(piece, sharing.Piece):
                raise PumaError(f"{name}: published values are the owner's pieces of weights (p:)")
            state["bytes"] += write_piece(os.path.join(self._model_dir(model), "weights"), name[2:], piece)
        return {"bytes": state["bytes"]}

    def _on_publish_end(self, model: str) -> dict:
        state = self._publishing.pop(model, None)
        if state is None:
            raise PumaError(f"model {model} is not being published")
        folder = self._model_dir(model)
        view = self._view_of(read_manifest(folder)[0])
        missing = [n for n in view.weight_names if not os.path.exists(share_path(os.path.join(folder, "weights"), n))]
        if missing:
            raise PumaError(f"model {model}: {len(missing)} weights were not sent (first: {missing[0]})")
        open(os.path.join(folder, "complete"), "w").close()
        return {"bytes": state["bytes"], "weights": len(view.weight_names)}

    def _on_unpublish(self, model: str) -> dict:
        folder = self._model_dir(model)
        existed = os.path.isdir(folder)
        shutil.rmtree(folder, ignore_errors=True)
        self.views.pop(model, None)
        self._drop_model(model)
        return {"removed": existed}

    def _on_status(self, model: str) -> dict:
        return {"published": os.path.exists(os.path.join(self._model_dir(model), "complete"))}

    def _view_of(self, manifest: dict):
        return self._models_from(manifest)

    def published_view(self, model: str):
        """The view of a model published to this party's store (cached)."""
        if model not in self.views:
            folder = self._model_dir(model)
            if not os.path.exists(os.path.join(folder, "complete")):
                raise PumaError(f"model {model} is not published to party rank {self.rank}")
            manifest, _ = read_manifest(folder)
            view = self._view_of(manifest)
            budget = self.budget if self.budget is not None else int(0.8 * memory.host()[1])
            view.streamed = share_bytes(view, self.protocol) > budget
            self.views[model] = view
        return self.views[model]

    def _drop_model(self, model: str) -> None:
        names = self.resident.pop(model, set())
        if names and self._party is not None:
            self._party.drop(sorted(names))

    # -- a client's job ------------------------------------------------------------------------

    def _on_job(self, model: str, ticket, peers) -> dict:
        """Admit a job on ``model``. ``peers``: the runs of the parties the client met (their
        greetings, which the server checked against each party's signature, so they are never
        older than what it met); links opened with other runs (a peer restarted) are opened again."""
        self.published_view(model)  # refused unless the model is published here
        if peers != self._peers and self._party is not None:
            raise LinksStale(f"party rank {self.rank} restarts: a peer restarted since its links opened")
        self._peers = peers
        return {"model": model}

    def _on_client_manifest(self, model: str) -> dict:
        """What the client's own party needs for a job on ``model`` (client-server mode only):
        the signed manifest. Nothing of a weight: the owner's party keeps them as its private
        values, and the client's party makes placeholders of their public shapes."""
        if not self.serves_clients:
            raise PermissionError("client_manifest is a command of a client-server deployment's owner party only")
        self.published_view(model)
        manifest, signature = read_manifest(self._model_dir(model))
        return {"manifest": manifest, "signature": signature.hex()}

    def reset_links(self) -> None:
        """Close the runtime and its links (after a peer restarted or a link failed); the next
        command opens new ones, and shares reload from the store."""
        if self._party is not None:
            try:
                self._party.close()
            except Exception as err:  # the links may be broken already
                log.debug("party rank %d: closing its links: %s", self.rank, err)
        self._party = None
        self.resident.clear()
        self._compiled.clear()
        self._slots.clear()
        self._outputs.clear()
        self._peers = None

    def _on_inputs(self, bundle) -> None:
        bad = [n for n in bundle.values if n[:2] not in ("i:", "u:")]
        if bad:
            raise PumaError(f"{bad[0]}: a client's inputs are named i:<name> (secret) or u:<name> (public)")
        self.party.receive(bundle)

    def _on_run_task(self, model: str, approx: str, spec, slot: str, bind, secret, public) -> dict:
        view = self.published_view(model)
        program = view.program(approx, spec)  # refused unless the owner's policy allows it
        if not isinstance(bind, dict) or not all(isinstance(v, str) for v in bind.values()):
            raise PumaError("bind maps a program's names to the model's: strings only")
        for local, target in bind.items():
            messages.name(target, "bind target")
        params = program.select_params(view.param_avals, bind)
        state = program.select_state(self._slots.get(slot, {}), bind)
        options = self.protocol.with_settings(view.spu_settings(approx)).compiler_options()
        compiled = self._compile(program, view.model_id, params, state, secret, public, options)
        lowered = compiled.lowered
        weights = view.weights_prefix
        inputs = [programs.bound(k, n, slot, bind, weights) for k, n in lowered.inputs]
        outputs = [programs.bound(k, n, slot, bind, weights) for k, n in lowered.outputs]
        loaded = self._ensure_weights(view, [n for n in inputs if n.startswith(weights)])
        try:
            profile = self._run(compiled.key, inputs, outputs)
        finally:
            self.party.drop([n for n in inputs if n[:2] in ("i:", "u:")])
            if view.streamed:
                self.party.drop(loaded)
                self.resident.get(model, set()).difference_update(loaded)
        if lowered.state_avals is not None:
            current = self._slots.setdefault(slot, {})
            for k, v in lowered.state_avals.items():
                current[bind.get(k, k)] = v
        self._outputs = set(outputs[: lowered.reveal_count])
        if not isinstance(profile, float):
            profile = messages.put_profile(profile)
        return {"profile": profile, "compile_s": compiled.seconds, "outputs": lowered.reveal_count}

    def _compile(self, program, model: str, params, state, secret, public, options) -> _Compiled:
        cache_key = (model, program.cache_key(params, state, secret, public))
        if cache_key not in self._compiled:
            start = time.perf_counter()
            lowered = programs.lower(program, params, state, secret, public)
            code = programs.compile_code(
                program.name, lowered.fn, lowered.flat_args, lowered.visibility, options, self.program_cache()
            )
            key = programs.code_key(program.name, code)
            self.party.install(key, program.name, self.code_hook(code, self.rank) if self.code_hook else code)
            self._compiled[cache_key] = _Compiled(key, lowered, time.perf_counter() - start)
            return self._compiled[cache_key]
        return dataclasses.replace(self._compiled[cache_key], seconds=0.0)

    def program_cache(self) -> str | None:
        """Where this party caches the programs it compiled itself (built from specs, never a
        caller's code): its store's folder."""
        return compile_cache.party_folder(self.store)

    def _ensure_weights(self, view, names: list[str]) -> list[str]:
        """Load the weights ``names`` a run needs from this party's store into the runtime;
        returns the ones loaded now."""
        held = self.resident.setdefault(view.model_id, set())
        missing = [n for n in names if n not in held]
        if missing:
            folder = os.path.join(self._model_dir(view.model_id), "weights")
            for name in missing:
                self.party.set(name, read_share(share_path(folder, name[len(view.weights_prefix) :])))
            held.update(missing)
        return missing

    def _on_outputs(self, names: list[str]):
        bad = [n for n in names if n not in self._outputs]
        if bad:
            raise PumaError(f"{bad[0]} is not an output of the last run: a client receives only what it ran")
        try:
            return self.party.send(names)
        finally:
            self.party.drop(names)
            self._outputs.difference_update(names)

    def _on_free(self, slot: str) -> None:
        avals = self._slots.pop(slot, None)
        if avals:
            self.party.drop(programs.leaf_names(f"s:{slot}:", avals))

    # -- the operator of a sim or ray session ------------------------------------------------------

    def _on_weights(self, bundle) -> None:
        self.party.receive(bundle)

    def _on_install(self, key: str, name: str, code: bytes) -> None:
        self.party.install(key, name, self.code_hook(code, self.rank) if self.code_hook else code)

    def _on_run(self, key: str, inputs: list[str], outputs: list[str]):
        return self._run(key, inputs, outputs)

    def _run(self, key: str, inputs: list[str], outputs: list[str]):
        """Run installed code: this party's profile, or its seconds where its process log is
        shared (``sim``: the mesh attributes the profiles)."""
        if self.process_log is None:
            return self.party.run(key, inputs, outputs)
        return self.party.run_profiled(key, inputs, outputs, self.process_log)

    def _on_collect(self, names: list[str]):
        return self.party.send(names)

    def _on_drop(self, names: list[str]) -> None:
        self.party.drop(names)

    def _share_folder(self, folder) -> str:
        if not isinstance(folder, str) or not folder:
            raise PumaError("a share store is a folder")
        return os.path.join(folder, f"party{self.rank}")

    def _on_store(self, names: list[str], folder: str) -> int:
        where = self._share_folder(folder)
        os.makedirs(where, exist_ok=True)
        return sum(write_share(share_path(where, n), self.party.get(n)) for n in names)

    def _on_restore(self, names: list[str], folder: str) -> int:
        where = self._share_folder(folder)
        paths = [share_path(where, n) for n in names]
        if not all(os.path.exists(p) for p in paths):
            return -1
        for name, path in zip(names, paths):
            self.party.set(name, read_share(path))
        return sum(os.path.getsize(p) for p in paths)


def share_bytes(view, protocol) -> int:
    """Bytes of one party's shares of a model's weights under ``protocol`` (a ProtocolConfig: two
    ring elements per weight for ABY3, one for the two-party protocols)."""
    import numpy as np

    words = (2 if protocol.world_size == 3 else 1) * int(protocol.field.removeprefix("FM")) // 8
    return sum(
        int(np.prod(a.shape, dtype=np.int64)) * words for a in programs.flat_named_avals(view.param_avals).values()
    )


# -- this party's own files: shares and manifests, a fixed format (no pickle) ------------------------

SHARE_MAGIC = b"PUMASHR1"
_LEN = struct.Struct("<Q")


def share_path(folder: str, name: str) -> str:
    """The file of weight or share ``name`` in ``folder`` (names are checked: no path tricks)."""
    return os.path.join(folder, messages.name(name).replace("/", "~") + ".share")


def write_share(path: str, share) -> int:
    """Write one ``libspu.Share``: magic, then its meta and chunks, each length-prefixed."""
    with open(path + ".tmp", "wb") as f:
        f.write(SHARE_MAGIC)
        for part in (share.meta, *share.share_chunks):
            f.write(_LEN.pack(len(part)))
            f.write(part)
    os.replace(path + ".tmp", path)
    return os.path.getsize(path)


def write_piece(folder: str, name: str, piece) -> int:
    """Append one owner's piece (:class:`~puma.runtime.sharing.Piece`) of weight ``name`` to its
    file, expanded to this party's chunk; the first piece starts the file with the meta."""
    path = share_path(folder, name)
    part = path + ".part"
    start = not os.path.exists(part)
    with open(part, "ab") as f:
        if start:
            f.write(SHARE_MAGIC + _LEN.pack(len(piece.meta)) + piece.meta)
        if piece.count:
            chunk = piece.expand()
            f.write(_LEN.pack(len(chunk)))
            f.write(chunk)
    if piece.last:
        os.replace(part, path)
    return piece.nbytes


def read_share(path: str):
    """The ``libspu.Share`` in ``path`` (checked: magic, lengths within the file)."""
    import spu.libspu as libspu

    size = os.path.getsize(path)
    parts = []
    with open(path, "rb") as f:
        if f.read(len(SHARE_MAGIC)) != SHARE_MAGIC:
            raise PumaError(f"{path} is not a share file")
        while True:
            head = f.read(_LEN.size)
            if not head:
                break
            (length,) = _LEN.unpack(head)
            if len(head) != _LEN.size or length > size:
                raise PumaError(f"{path} is damaged")
            data = f.read(length)
            if len(data) != length:
                raise PumaError(f"{path} is truncated")
            parts.append(data)
    if not parts:
        raise PumaError(f"{path} holds no share")
    share = libspu.Share()
    share.meta, share.share_chunks = parts[0], parts[1:]
    return share


def read_manifest(folder: str) -> tuple[dict, bytes]:
    with open(os.path.join(folder, "manifest.json")) as f:
        doc = json.load(f)
    return doc["manifest"], bytes.fromhex(doc["signature"])
