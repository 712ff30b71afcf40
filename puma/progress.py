"""Feedback on long waits: what puma is doing, as log records of the ``puma.progress`` logger.

Library code only logs here (loading a model, sharing its weights, compiling a program once per
input shape, waiting for a party to come up). The ``puma`` command shows these lines on stderr
when stderr is a terminal and the output is not ``--json``; Python users attach a handler of
their own (``logging.getLogger("puma.progress")``) to see them.

:func:`warn` says that something went wrong and puma carried on (a dropped cache entry), in one
line starting with ``puma:`` on the ``puma.warnings`` logger. The ``puma`` command always prints
it (``--json`` too); so does Python when no logging is configured (logging's last resort).
"""

from __future__ import annotations

import logging

log = logging.getLogger("puma.progress")
warnings_log = logging.getLogger("puma.warnings")


def status(message: str, *args) -> None:
    """Say what is happening now (one line, INFO)."""
    log.info(message, *args)


def warn(message: str, *args) -> None:
    """Say that something went wrong and puma carried on (one line, WARNING, ``puma: ...``)."""
    warnings_log.warning("puma: " + message, *args)
