"""Child processes that never outlive their parent.

:func:`die_with` arms a child so it ends when its parent dies, however the parent dies (SIGKILL
included): party processes use it so none keeps its ports after its supervisor is gone.
:func:`run_isolated` runs one function in a fresh (spawned) child and returns its result, so a
benchmark cell gets a process of its own: its memory is returned when it ends, what it patches
stays in it, and a cell that runs out of memory fails alone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Callable

from puma.errors import PumaError

log = logging.getLogger(__name__)


def die_with(parent: int) -> None:
    """End this process when ``parent`` dies: Linux's parent-death signal (SIGTERM), and a
    watchdog on the parent pid where that is not available."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("no parent-death signal here; watching the parent pid")

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def parent_death_signal() -> None:
    """``preexec_fn`` for ``subprocess.Popen``: the child gets SIGTERM when this process dies,
    however it dies (a test runner or benchmark killed with SIGKILL leaves no parties behind)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_main(pipe, parent: int, fn: Callable, args: tuple) -> None:
    die_with(parent)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s child %(levelname)s: %(message)s")
    try:
        result = ("ok", fn(*args))
    except PumaError as err:
        result = ("error", str(err))
    except Exception as err:  # noqa: BLE001 - the parent reports it in one line
        log.exception("%s failed", getattr(fn, "__name__", "the child"))
        result = ("error", f"{type(err).__name__}: {err}")
    pipe.send(result)
    pipe.close()


def run_isolated(fn: Callable, *args, what: str = "the child process") -> Any:
    """``fn(*args)`` in a spawned child process (``fn`` and ``args`` must pickle); its return
    value, or :class:`PumaError` with the child's error or its exit status. The child is
    stopped if this process is interrupted, and dies with it otherwise."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(theirs, os.getpid(), fn, args), name="puma-isolated")
    proc.start()
    theirs.close()
    try:
        try:
            status, value = ours.recv()
        except EOFError:
            proc.join()
            code = proc.exitcode
            cause = f"was killed by signal {-code}" if code and code < 0 else f"exited with status {code}"
            hint = " (out of memory?)" if code == -signal.SIGKILL else ""
            raise PumaError(f"{what} {cause}{hint} before it returned a result") from None
        proc.join()
    finally:
        ours.close()
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if status == "error":
        raise PumaError(f"{what}: {value}")
    return value
