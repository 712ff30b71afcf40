"""Backends that run programs: plaintext, and the secure ``sim``, ``nodes`` and ``ray`` meshes."""

from __future__ import annotations

from puma.errors import PumaError
from puma.runtime.base import PlaintextSession, Session

BACKENDS = ("plaintext",)


def open_session(backend: str = "plaintext", **options) -> Session:
    """Open a session on ``backend``; ``options`` configure the secure backends."""
    if backend == "plaintext":
        return PlaintextSession()
    raise PumaError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
