"""Feedback on long waits: what puma is doing, as log records of the ``puma.progress`` logger.

Library code only logs here (loading a model, sharing its weights, compiling a program once per
input shape, waiting for a party to come up). The ``puma`` command shows these lines on stderr
when stderr is a terminal and the output is not ``--json``; Python users attach a handler of
their own (``logging.getLogger("puma.progress")``) to see them.
"""

from __future__ import annotations

import logging

log = logging.getLogger("puma.progress")


def status(message: str, *args) -> None:
    """Say what is happening now (one line, INFO)."""
    log.info(message, *args)
