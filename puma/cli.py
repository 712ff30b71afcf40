"""The ``puma`` command line: ``demo``, ``generate``, ``embed``, ``classify``, ``calibrate``,
``bench``, ``owner``, ``node`` (their parsers and handlers: :mod:`puma.subcommands`).

Every failure a user can cause ends in one line ``puma: error: <what to fix>`` on stderr and a
non-zero exit status (1 for errors found while running, 2 for bad arguments).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

from puma import interrupts, subcommands
from puma.errors import PumaError

log = logging.getLogger("puma")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``puma: error: <what> (see <command> --help)``, status 2."""

    def error(self, message: str):
        self.exit(2, f"puma: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="puma", description="Private Transformer inference with 3-party MPC (SPU).")
    common = _Parser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging, -vv for debug (default: warnings only)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in subcommands.GROUPS:
        importlib.import_module(group).add_parsers(sub, common)
    return parser


def _restart_keeping_heap() -> None:
    """Start this command again with glibc set to keep freed memory (:mod:`puma.runtime.memory`)
    and, when the parties run as threads of this process, OpenMP's threads shared out among them
    (:func:`_thread_env`): both only take effect at process start."""
    from puma.runtime import memory

    if memory.needs_heap_restart() and sys.executable and getattr(sys, "orig_argv", None):
        os.execve(
            sys.executable,
            [sys.executable, *sys.orig_argv[1:]],
            {**os.environ, **memory.heap_env(), **_thread_env(sys.argv[1:])},
        )


#: Commands whose parties run as threads of this process unless ``--backend`` says otherwise.
IN_PROCESS = ("generate", "embed", "classify", "demo", "bench")


def _thread_env(argv: list[str]) -> dict[str, str]:
    """``OMP_THREAD_LIMIT`` for a ``sim`` run: the cores divided among the three parties' threads
    (SPU's matrix products use 4 OpenMP threads each; three parties on 2 cores oversubscribe
    them: a SmolLM2 prefill took 27 s that way, 18 s with one thread each). Set by the user: kept."""
    if "OMP_THREAD_LIMIT" in os.environ or not argv or argv[0] not in IN_PROCESS:
        return {}
    backend = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--backend"), "sim")
    if backend != "sim":
        return {}
    return {"OMP_THREAD_LIMIT": str(max(1, (os.cpu_count() or 1) // 3))}


#: Seconds between progress lines when stderr is not a terminal (a log file, CI): a long run
#: still says what it is doing; a short one (an error included) prints none.
QUIET_PROGRESS_S = 30.0


class _ProgressLines(logging.Handler):
    """Writes :mod:`puma.progress` records to whatever ``sys.stderr`` is at the time: every one
    (``interval`` 0), or the latest one each ``interval`` seconds after the first ``interval``."""

    def __init__(self, interval: float = 0.0, clock=time.monotonic):
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._last = clock()

    def emit(self, record: logging.LogRecord) -> None:
        now = self._clock()
        if self.interval and now - self._last < self.interval:
            return
        self._last = now
        print(f"puma: {record.getMessage()} ...", file=sys.stderr, flush=True)


class _WarningLines(logging.Handler):
    """Writes :func:`puma.progress.warn` lines (``puma: ...`` already) to whatever ``sys.stderr``
    is at the time, each one, whatever else is shown."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stderr, flush=True)


def _stopped(argv, what: str, status: int) -> int:
    """The one line for a run stopped by a signal. As a command, end at once: ``sim`` party
    threads may still be inside SPU, and interpreter shutdown under them can crash."""
    print(f"puma: error: {what}", file=sys.stderr, flush=True)
    if argv is None:
        sys.stdout.flush()
        os._exit(status)
    return status


def _show_progress(on: bool, terminal: bool) -> None:
    """Progress lines on stderr: every one at a terminal, one per :data:`QUIET_PROGRESS_S` into
    a file or pipe; none with --json (``on`` false). Warnings always."""
    from puma import progress

    for handler in [h for h in progress.log.handlers if isinstance(h, _ProgressLines)]:
        progress.log.removeHandler(handler)
    progress.log.propagate = not on
    if on:
        progress.log.addHandler(_ProgressLines(0.0 if terminal else QUIET_PROGRESS_S))
        progress.log.setLevel(logging.INFO)
    if not any(isinstance(h, _WarningLines) for h in progress.warnings_log.handlers):
        progress.warnings_log.addHandler(_WarningLines())
        progress.warnings_log.propagate = False


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _restart_keeping_heap()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    _show_progress(not getattr(args, "json", False), sys.stderr.isatty())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    previous = interrupts.install() if argv is None else {}
    try:
        status = args.func(args)
        interrupts.check()  # a signal whose exception a finaliser dropped ends the command too
        return status
    except PumaError as err:
        print(f"puma: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _stopped(argv, "interrupted", 130)
    except interrupts.Terminated:
        return _stopped(argv, "terminated (SIGTERM); sessions closed", 143)
    finally:
        interrupts.restore(previous)


if __name__ == "__main__":
    sys.exit(main())
