"""Compiled SPU programs kept on disk, so that a new process does not compile them again.

Compiling a program for SPU takes seconds (stories260K's prefill: about 8 s, of which JAX's
lowering is about 0.3 s); :func:`puma.runtime.programs.compile_code` first lowers the program
and looks here for the pphlo code SPU compiled from the same lowering before.

**Key.** SHA-256 of everything that decides the code: the program's StableHLO text as SPU's
frontend lowers it (every constant in full), its inputs' shapes, dtypes and visibilities, the
SPU compiler options (every field), and the versions of puma, SPU, JAX and jaxlib. A changed
program, input shape, option or version is another key: a miss, never someone else's code.

**Entries** are one file per key, ``<key>.pphlo``: a fixed magic, the format version, the key,
the code's length and SHA-256, then the code (SPU's pphlo bytes; nothing is unpickled). A read
checks all of them; an entry that fails (truncated, flipped bytes, another format) is deleted,
said in one line (``puma: compile cache entry <file> was corrupt ...; dropped and rebuilt``), and
the program is compiled and written again. Writes go to a temporary file moved into place, so
processes that write the same entry at once leave one whole entry.

**Where, and who sees what.** The driver of a ``sim`` or ``ray`` session (one trust domain; it
compiles every program) keeps entries in the user's cache folder, ``$PUMA_CACHE/programs``
(default ``~/.cache/puma/programs``, beside the calibrated ranges). On ``nodes`` each party
keeps its own, ``<store>/<party id>/programs``, holding only programs it built and compiled
itself from a published model's manifest: nothing a client or the owner sends is cached.
An entry tells no more than the party already knows: programs are compiled from shapes, the
manifest and a run's public settings; no weight, input or share is in them.

**Programs puma builds itself skip even the lowering.** Tracing and lowering SmolLM2's decode
program takes about 10 s; a warm first token should not wait for it. A program built from a
spec by puma's own builders (:mod:`puma.tasks`, :mod:`puma.staged`) with a registered
approximation set is a function of puma's source, the set's name, the model's config and norm
shifts, the builder's arguments and the input shapes, and nothing else. For those an *index*
entry (``<index key>.json``) maps the SHA-256 of exactly that (plus the SHA-256 of every ``.py``
file of the puma, puma.protocols and puma.models packages, the compiler options and the
versions) to the code's entry and the program's flat signature (output names, revealed tree,
new state's shapes); a hit needs no trace at all. Any edit to puma's source changes the index
key. An index entry that does not parse, names a code entry that is missing or damaged, or
describes other inputs is dropped like a damaged code entry and the program is lowered again.

``PUMA_COMPILE_CACHE=0`` in the environment turns the cache off (every program compiles).
:data:`stats` counts hits, misses and dropped entries in this process.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from typing import Callable

from puma import progress

log = logging.getLogger(__name__)

#: The subfolder entries live in (of the user's cache folder, or of a party's store).
FOLDER = "programs"
MAGIC = b"PUMA-SPU-PPHLO\n\0"
FORMAT = 1
_HEADER = struct.Struct(f"<{len(MAGIC)}sI32sQ32s")  # magic, format, key, code length, code SHA-256

#: Hits, misses and dropped (unreadable) entries in this process; ``index``: built-in programs
#: found through the index (no trace; their code entries count as hits too).
stats: collections.Counter = collections.Counter()


def enabled() -> bool:
    """False when ``PUMA_COMPILE_CACHE=0`` (or ``off``, ``false``, ``no``) is set."""
    return os.environ.get("PUMA_COMPILE_CACHE", "1").strip().lower() not in ("0", "off", "false", "no")


def user_folder() -> str | None:
    """The driver's cache of programs (``sim``, ``ray``), or None when the cache is off."""
    from puma.calibration import cache_root

    return os.path.join(cache_root(), FOLDER) if enabled() else None


def party_folder(store: str | None) -> str | None:
    """A party's own cache of programs in its store, or None (no store, or the cache is off)."""
    return os.path.join(store, FOLDER) if store and enabled() else None


def key(text: str, flat_args: list, visibility: list, compiler_options) -> str:
    """The entry key (hex SHA-256) of a program lowered to ``text``, on inputs ``flat_args``
    with ``visibility``, compiled with ``compiler_options`` by these versions."""
    import jax
    import jaxlib
    import spu

    import puma

    options = {
        name: str(getattr(compiler_options, name))
        for name in dir(compiler_options)
        if not name.startswith("_") and not callable(getattr(compiler_options, name))
    }
    described = {
        "versions": [puma.__version__, spu.__version__, jax.__version__, jaxlib.__version__],
        "options": options,
        "inputs": [[list(a.shape), str(a.dtype), str(v)] for a, v in zip(flat_args, visibility, strict=True)],
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    digest.update(b"\0")
    digest.update(text.encode())
    return digest.hexdigest()


def code(folder: str, name: str, entry_key: str, build: Callable[[], bytes]) -> bytes:
    """The code of program ``name`` from entry ``entry_key`` in ``folder``, or ``build()`` (then
    written there). Errors of the disk (a read-only folder) only cost the cache, never the run."""
    path = os.path.join(folder, f"{entry_key}.pphlo")
    start = time.perf_counter()
    found = _read(path, bytes.fromhex(entry_key))
    if found is not None:
        stats["hit"] += 1
        seconds = time.perf_counter() - start
        log.info("compile cache hit: %s (%d KB of pphlo, read in %.2f s)", name, len(found) // 1024, seconds)
        return found
    stats["miss"] += 1
    built = build()
    log.info("compile cache miss: %s compiled in %.1f s (entry %s)", name, time.perf_counter() - start, path)
    _write(path, bytes.fromhex(entry_key), built)
    return built


def _read(path: str, entry_key: bytes) -> bytes | None:
    """The code of the entry at ``path``, or None (absent, or dropped: see the module doc)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        log.info("compile cache entry %s unreadable (%s): compiling", path, err)
        return None
    problem = _problem(data, entry_key)
    if problem is None:
        return data[_HEADER.size :]
    _drop(path, problem)
    return None


def _drop(path: str, problem: str) -> None:
    """Delete an entry (code or index) that cannot be used, in one ``puma:`` line."""
    stats["dropped"] += 1
    try:
        os.remove(path)
    except OSError as err:
        log.debug("compile cache entry %s not removed (%s)", path, err)
    progress.warn("compile cache entry %s was %s; dropped and rebuilt", path, problem)


def _problem(data: bytes, entry_key: bytes) -> str | None:
    """What is wrong with an entry's bytes, or None."""
    if len(data) < _HEADER.size:
        return f"truncated ({len(data)} bytes)"
    magic, version, stored_key, length, checksum = _HEADER.unpack_from(data)
    if magic != MAGIC:
        return "corrupt (not a puma compile cache entry)"
    if version != FORMAT:
        return f"stale (entry format {version}, this puma writes {FORMAT})"
    if stored_key != entry_key:
        return "corrupt (its key does not match its name)"
    body = memoryview(data)[_HEADER.size :]
    if len(body) != length:
        return f"{'truncated' if len(body) < length else 'corrupt'} ({len(body)} of {length} code bytes)"
    if hashlib.sha256(body).digest() != checksum:
        return "corrupt (checksum mismatch)"
    return None


def _write(path: str, entry_key: bytes, body: bytes) -> None:
    """Write a code entry: its header, then the code (:func:`_replace`)."""
    header = _HEADER.pack(MAGIC, FORMAT, entry_key, len(body), hashlib.sha256(body).digest())
    _replace(path, header + body)


def _replace(path: str, data: bytes) -> None:
    """Write ``path`` atomically: a temporary file in the same folder, then ``os.replace``.
    Errors of the disk only cost the cache."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    except OSError as err:
        log.info("compile cache: %s not written (%s)", path, err)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as err:
        log.info("compile cache: %s not written (%s)", path, err)
        try:
            os.remove(tmp)
        except OSError:
            pass


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 of every ``.py`` file of the puma, puma.protocols and puma.models packages (paths
    and contents, in order): the code a built-in program is traced from."""
    import puma
    import puma.models
    import puma.protocols

    digest = hashlib.sha256()
    roots = sorted({os.path.realpath(p) for pkg in (puma, puma.protocols, puma.models) for p in pkg.__path__})
    for root in roots:
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read() + b"\0")
    return digest.hexdigest()


def index_key(described: str, compiler_options) -> str:
    """The index key of a built-in program: ``described`` (its name, builder key, model config,
    shifts and input signature, as text) with puma's source, the options and the versions."""
    return key(source_digest() + "\0" + described, [], [], compiler_options)


def read_index(folder: str, index: str) -> dict | None:
    """The index entry ``index`` in ``folder`` (see the module doc), or None (absent, or dropped)."""
    path = os.path.join(folder, f"{index}.json")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("format") != FORMAT or doc.get("index") != index or not isinstance(doc.get("program"), dict):
            raise ValueError("not an index entry of this format")
        return doc
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        drop_index(folder, index, f"corrupt ({err})")
        return None


def drop_index(folder: str, index: str, problem: str) -> None:
    """Delete an index entry that cannot be used, in one ``puma:`` line."""
    _drop(os.path.join(folder, f"{index}.json"), problem)


def write_index(folder: str, index: str, code_key: str, program: dict) -> None:
    """Record that built-in program ``index`` compiles to code entry ``code_key``."""
    body = json.dumps({"format": FORMAT, "index": index, "code": code_key, "program": program}).encode()
    _replace(os.path.join(folder, f"{index}.json"), body)


def read_code(folder: str, entry_key: str) -> bytes | None:
    """The code of entry ``entry_key`` in ``folder``, or None (absent, or dropped)."""
    try:
        raw = bytes.fromhex(entry_key)
    except ValueError:
        return None
    found = _read(os.path.join(folder, f"{entry_key}.pphlo"), raw)
    if found is not None:
        stats["hit"] += 1
    return found
