"""The compile cache (puma.runtime.compile_cache): compiled programs survive the process.

Oracles: numpy for the tiny program's result (ABY3 FM64/18 with SPU's tanh: error ~6e-3,
asserted at 2e-2); SPU's own frontend (``spu.utils.frontend.compile``) for the code; the module
doc's entry format for what a damaged entry is. Processes are ``python -c`` children, each ended
by ``subprocess.run``'s timeout whatever happens.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import spu.libspu as libspu
from spu.utils import frontend as spu_fe

from puma import cli, progress
from puma.errors import PumaError
from puma.program import Program
from puma.runtime import compile_cache, programs
from puma.runtime.commands import PartyService
from puma.runtime.config import ProtocolConfig

#: A sim session runs a tiny program once and prints what it got, what numpy says, the cache's
#: counters and the compile time of its cost report.
SCRIPT = """
import json
import numpy as np
import jax.numpy as jnp
from puma.program import Program
from puma.runtime import compile_cache, open_session

def tiny(params, state, secret, public):
    return {"y": jnp.tanh(secret["x"] @ params["w"]) * public["scale"]}, {}

rng = np.random.default_rng(0)
w = rng.normal(size=(4, 3)).astype(np.float32)
x = rng.normal(size=(2, 4)).astype(np.float32)
scale = np.array([0.5, 1.0, 2.0], np.float32)
with open_session("sim", protocol="aby3") as session:
    session.load_params({"w": w})
    with session.measure() as report:
        out = session.run(Program("tiny", tiny), secret={"x": x}, public={"scale": scale})
print(json.dumps({"got": np.asarray(out["y"]).tolist(), "want": (np.tanh(x @ w) * scale).tolist(),
                  "stats": dict(compile_cache.stats), "compile_s": report.compile_s}))
"""


def _run_tiny(cache: str, **env) -> tuple[dict, list[str]]:
    """The script in a new process with ``PUMA_CACHE=cache``: its report and its stderr lines."""
    environ = {k: v for k, v in os.environ.items() if k != "PUMA_COMPILE_CACHE"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**environ, "PUMA_CACHE": cache, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(report["got"], report["want"], atol=2e-2)
    return report, done.stderr.splitlines()


def _entries(folder) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".pphlo"))


def test_a_new_process_finds_the_program_compiled_by_the_last(tmp_path):
    first, _ = _run_tiny(str(tmp_path))
    assert first["stats"] == {"miss": 1}
    (entry,) = _entries(tmp_path / "programs")
    second, err = _run_tiny(str(tmp_path))
    assert second["stats"] == {"hit": 1}, err
    assert _entries(tmp_path / "programs") == [entry]
    off, _ = _run_tiny(str(tmp_path), PUMA_COMPILE_CACHE="0")
    assert off["stats"] == {}  # turned off: compiled, neither looked up nor written


def _flip(path):
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage, problem", [(_flip, "corrupt (checksum mismatch)"), (_truncate, "truncated")])
def test_a_damaged_entry_is_dropped_in_one_line_and_rebuilt(tmp_path, damage, problem):
    _run_tiny(str(tmp_path))
    (entry,) = _entries(tmp_path / "programs")
    good = open(entry, "rb").read()
    damage(entry)
    report, err = _run_tiny(str(tmp_path))  # the result is still right (checked in _run_tiny)
    assert report["stats"] == {"dropped": 1, "miss": 1}
    lines = [line for line in err if line.startswith("puma:")]
    assert len(lines) == 1 and lines[0].startswith(f"puma: compile cache entry {entry} was {problem}"), err
    assert lines[0].endswith("; dropped and rebuilt")
    assert open(entry, "rb").read() == good  # rewritten whole
    again, err = _run_tiny(str(tmp_path))
    assert again["stats"] == {"hit": 1} and not [line for line in err if line.startswith("puma:")]


#: A built-in program (llama-debug's greedy prefill and decode, puma-chat) in a sim session,
#: beside its plaintext run; how many programs this process traced.
BUILTIN = """
import json
from puma.api import SecureModel
from puma.runtime import compile_cache, programs

traced = []
lower = programs.lower
programs.lower = lambda program, *avals: traced.append(program.name) or lower(program, *avals)
want = SecureModel.from_pretrained("llama-debug", approx="puma-chat").generate_ids([[5, 6, 7, 8]], 3).tokens
with SecureModel.from_pretrained("llama-debug", approx="puma-chat", backend="sim") as m:
    got = m.generate_ids([[5, 6, 7, 8]], 3)
print(json.dumps({"got": got.tokens, "want": want, "stats": dict(compile_cache.stats), "traced": traced}))
"""


def _run_builtin(cache: str) -> tuple[dict, list[str]]:
    environ = {k: v for k, v in os.environ.items() if k != "PUMA_COMPILE_CACHE"}
    done = subprocess.run(
        [sys.executable, "-c", BUILTIN],
        env={**environ, "PUMA_CACHE": cache},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["got"] == report["want"]  # greedy tokens equal plaintext's, cache or not
    return report, done.stderr.splitlines()


def test_builtin_programs_skip_the_trace_in_a_new_process_and_a_bad_index_is_rebuilt(tmp_path):
    first, _ = _run_builtin(str(tmp_path))
    assert first["stats"] == {"miss": 2} and len(first["traced"]) >= 2
    indexes = sorted((tmp_path / "programs").glob("*.json"))
    assert len(indexes) == 2
    second, err = _run_builtin(str(tmp_path))
    assert second["stats"] == {"hit": 2, "index": 2} and second["traced"] == [], err
    indexes[0].write_text("{not json")
    third, err = _run_builtin(str(tmp_path))
    lines = [line for line in err if line.startswith("puma:")]
    assert len(lines) == 1 and "was corrupt" in lines[0] and lines[0].endswith("; dropped and rebuilt"), err
    assert third["stats"] == {"dropped": 1, "hit": 2, "index": 1} and len(third["traced"]) == 1
    fourth, _ = _run_builtin(str(tmp_path))
    assert fourth["stats"] == {"hit": 2, "index": 2}


def test_index_keys_change_with_pumas_source_and_the_options(monkeypatch):
    options = ProtocolConfig().compiler_options()
    base = compile_cache.index_key("program", options)
    assert compile_cache.index_key("program", options) == base
    assert compile_cache.index_key("another program", options) != base
    monkeypatch.setattr(compile_cache, "source_digest", lambda: "edited")
    assert compile_cache.index_key("program", options) != base


# -- in this process: keys, the entry format, parties --------------------------------------------


def _fn(body):
    def flat(x, w):
        return [body(x @ w)]

    return flat


ARGS = [jax.ShapeDtypeStruct((2, 4), np.float32), jax.ShapeDtypeStruct((4, 3), np.float32)]
SECRET = [libspu.Visibility.VIS_SECRET] * 2


def _key(fn, options=None, visibility=SECRET, args=ARGS):
    options = options or ProtocolConfig().compiler_options()
    return compile_cache.key(programs.spu_lowering(fn, args).as_text(), args, visibility, options)


def test_keys_change_with_the_program_its_inputs_and_the_options_only():
    base = _key(_fn(jnp.tanh))
    assert _key(_fn(jnp.tanh)) == base  # another function object, the same program
    assert _key(_fn(jnp.exp)) != base  # another body
    assert _key(_fn(lambda y: y * 1.5)) != _key(_fn(lambda y: y * 2.5))  # another constant
    assert _key(_fn(jnp.tanh), visibility=[SECRET[0], libspu.Visibility.VIS_PUBLIC]) != base
    wider = [jax.ShapeDtypeStruct((3, 4), np.float32), ARGS[1]]
    assert _key(_fn(jnp.tanh), args=wider) != base
    options = ProtocolConfig().compiler_options()
    options.enable_optimize_denominator_with_broadcast = not options.enable_optimize_denominator_with_broadcast
    assert _key(_fn(jnp.tanh), options) != base


def test_cached_code_is_spus_own_and_a_changed_option_misses(tmp_path):
    options = ProtocolConfig().compiler_options()
    before = compile_cache.stats.copy()
    code = programs.compile_code("t", _fn(jnp.tanh), ARGS, SECRET, options, str(tmp_path))
    again = programs.compile_code("t", _fn(jnp.tanh), ARGS, SECRET, options, str(tmp_path))
    spus, _ = spu_fe.compile(
        spu_fe.Kind.JAX, _fn(jnp.tanh), ARGS, {}, ["a", "b"], SECRET, lambda outs: ["o"] * len(outs), copts=options
    )
    assert code == again == spus.code
    options.disable_div_sqrt_rewrite = not options.disable_div_sqrt_rewrite
    programs.compile_code("t", _fn(jnp.tanh), ARGS, SECRET, options, str(tmp_path))
    programs.compile_code("t", _fn(jnp.exp), ARGS, SECRET, ProtocolConfig().compiler_options(), str(tmp_path))
    assert compile_cache.stats - before == {"miss": 3, "hit": 1}
    assert len(_entries(tmp_path)) == 3


KEY = "ab" * 32


class _Said(logging.Handler):
    """The lines a logger was given."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _entry(tmp_path, body=b"pphlo bytes") -> str:
    path = str(tmp_path / f"{KEY}.pphlo")
    compile_cache._write(path, bytes.fromhex(KEY), body)
    return path


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda d: b"NOT-PUMA" + d[8:], "corrupt (not a puma compile cache entry)"),
        (lambda d: d[:16] + (99).to_bytes(4, "little") + d[20:], "stale (entry format 99"),
        (lambda d: d[:20] + b"\0" * 32 + d[52:], "corrupt (its key does not match its name)"),
        (lambda d: d + b"more", "corrupt (15 of 11 code bytes)"),
        (lambda d: d[:30], "truncated (30 bytes)"),
        (lambda d: b"", "truncated (0 bytes)"),
    ],
)
def test_every_kind_of_damage_is_caught(tmp_path, monkeypatch, edit, problem):
    said = _Said()
    monkeypatch.setattr(progress.warnings_log, "handlers", [said])
    monkeypatch.setattr(progress.warnings_log, "propagate", False)
    path = _entry(tmp_path)
    data = open(path, "rb").read()
    open(path, "wb").write(edit(data))
    code = compile_cache.code(str(tmp_path), "t", KEY, lambda: b"rebuilt")
    assert code == b"rebuilt"
    (message,) = said.lines
    assert message.startswith(f"puma: compile cache entry {path} was {problem}")
    assert message.endswith("; dropped and rebuilt")
    assert compile_cache._read(path, bytes.fromhex(KEY)) == b"rebuilt"


def test_the_command_prints_the_warning_as_its_one_line(monkeypatch, capsys):
    monkeypatch.setattr(progress.warnings_log, "handlers", [])
    monkeypatch.setattr(progress.warnings_log, "propagate", True)
    monkeypatch.setattr(progress.log, "handlers", [])
    monkeypatch.setattr(progress.log, "propagate", True)
    cli._show_progress(False, False)  # --json: no progress lines, warnings still
    progress.status("compiling")
    progress.warn("compile cache entry %s was %s; dropped and rebuilt", "e.pphlo", "corrupt")
    assert capsys.readouterr().err == "puma: compile cache entry e.pphlo was corrupt; dropped and rebuilt\n"


def test_writers_of_one_entry_at_once_leave_a_whole_entry(tmp_path):
    path = str(tmp_path / f"{KEY}.pphlo")
    body = os.urandom(1 << 20)
    seen = []

    def write():
        for _ in range(10):
            compile_cache._write(path, bytes.fromhex(KEY), body)
            seen.append(compile_cache._read(path, bytes.fromhex(KEY)))

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 40 and all(s == body for s in seen)
    assert os.listdir(tmp_path) == [f"{KEY}.pphlo"]  # no temporary file left


class _Party:
    def install(self, key, name, code):
        self.installed = (key, name)


def test_a_party_caches_its_own_programs_in_its_store(tmp_path, monkeypatch):
    def tiny(params, state, secret, public):
        return {"y": secret["x"] @ params["w"]}, {}

    program = Program("tiny", tiny)
    params, secret = {"w": ARGS[1]}, {"x": ARGS[0]}
    options = ProtocolConfig().compiler_options()
    before = compile_cache.stats.copy()
    for _ in range(2):  # a party process, then the same party restarted
        service = PartyService(0, 3, _Party, protocol=ProtocolConfig(), store=str(tmp_path))
        service._compile(program, "m", params, {}, secret, {}, options)
    assert compile_cache.stats - before == {"miss": 1, "hit": 1}
    assert len(_entries(tmp_path / "programs")) == 1
    for model in ("programs", "./programs/x"):  # no model id reaches the cache folder
        with pytest.raises(PumaError, match="compile cache"):
            service._on_unpublish(model)
    monkeypatch.setenv("PUMA_COMPILE_CACHE", "0")
    assert compile_cache.party_folder(str(tmp_path)) is None and compile_cache.user_folder() is None
