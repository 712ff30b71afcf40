"""Approximation sets: the non-linear functions a Transformer evaluates, as pure jnp functions.

A model never calls ``jax.nn`` directly for a non-linearity: it receives an :class:`Ops` set and
calls ``ops.gelu``, ``ops.softmax`` and so on. The same model code then runs the exact plaintext
functions (``"exact"``), PUMA's fixed-point-friendly approximations (``"puma"``) or a baseline,
and the set carries the SPU runtime/compiler settings it relies on.

Use :func:`get` to look a set up by name::

    from puma import protocols
    ops = protocols.get("puma")
"""

from __future__ import annotations

from puma.protocols.base import MASK_FILL, Ops, SpuSettings

__all__ = ["MASK_FILL", "Ops", "SpuSettings", "get", "names"]


def _registry() -> dict[str, Ops]:
    from puma.protocols import exact, fast, mpcformer, puma

    sets = [exact.OPS, puma.OPS, fast.OPS, mpcformer.OPS, exact.SPU_OPS]
    return {s.name: s for s in sets}


def names() -> list[str]:
    """Names of the available approximation sets."""
    return sorted(_registry())


def get(name: str | Ops) -> Ops:
    """Return the approximation set called ``name`` (an :class:`Ops` passes through)."""
    if isinstance(name, Ops):
        return name
    sets = _registry()
    if name not in sets:
        raise ValueError(f"unknown approximation set {name!r}; choose one of {', '.join(sorted(sets))}")
    return sets[name]
