"""Signals that end a run, remembered so that none is lost.

Python runs a signal handler in the main thread between two bytecodes, wherever the thread is.
When that is a finaliser (a ``__del__`` method or a weakref callback, which Ray's object
references run all the time) the exception the handler raises is printed as "Exception ignored"
and dropped, and the run goes on: a Ray run once ended with status 0 after Ctrl-C. The CLI's
handlers go through :func:`stop`, which remembers the signal before raising it;
:func:`check`, called before every program run and when the command returns, raises it again.
"""

from __future__ import annotations

import signal
import threading


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that sessions close (parties, Ray) on the way out."""


#: The exception each handled signal raises in the main thread.
RAISES = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}

_pending: int | None = None


def stop(signum, frame=None):
    """A signal handler: remember ``signum`` and raise its exception."""
    global _pending
    _pending = signum
    raise RAISES[signum]()


def check() -> None:
    """Raise a remembered signal's exception again (in the main thread only: other threads
    carry on until the main thread stops them)."""
    if _pending is not None and threading.current_thread() is threading.main_thread():
        raise RAISES[_pending]()


def install() -> dict:
    """Handle SIGINT and SIGTERM with :func:`stop`; returns the previous handlers for :func:`restore`."""
    return {signum: signal.signal(signum, stop) for signum in RAISES}


def restore(previous: dict) -> None:
    """Put the handlers :func:`install` replaced back and forget any remembered signal."""
    global _pending
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    _pending = None
