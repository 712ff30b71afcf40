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

import importlib

from puma.protocols.base import MASK_FILL, ExecutionPlan, Ops, SpuSettings

__all__ = ["MASK_FILL", "REGISTRY", "ExecutionPlan", "Ops", "SpuSettings", "get", "names", "registered"]


#: The approximation sets: name -> (module in ``puma.protocols``, attribute holding its ``Ops``).
#: Adding a set is one module plus one line here; the CLI's ``--approx`` choices, the benchmarks
#: and the tests read this table. Modules are imported only when their set is asked for.
REGISTRY: dict[str, tuple[str, str]] = {
    "exact": ("exact", "OPS"),
    "puma": ("puma", "OPS"),
    "puma-fast": ("fast", "OPS"),
    "puma-lean": ("lean", "OPS"),
    "puma-chat": ("chat", "OPS"),
    "mpcformer": ("mpcformer", "OPS"),
    "spu": ("exact", "SPU_OPS"),
}


#: The sets an owner publishes unless told otherwise (``puma owner publish --approx``): the
#: defaults under MPC (puma-chat for generation, puma-fast for encoders) and the other sets of ours.
PUBLISHED = ("puma-chat", "puma-fast", "puma-lean", "puma")


def names() -> list[str]:
    """Names of the available approximation sets (no set is imported)."""
    return sorted(REGISTRY)


def get(name: str | Ops) -> Ops:
    """Return the approximation set called ``name`` (an :class:`Ops` passes through)."""
    if isinstance(name, Ops):
        return name
    if name not in REGISTRY:
        raise ValueError(f"unknown approximation set {name!r}; choose one of {', '.join(names())}")
    module, attribute = REGISTRY[name]
    ops = getattr(importlib.import_module(f"puma.protocols.{module}"), attribute)
    if ops.name != name:
        raise ValueError(f"puma.protocols.{module}.{attribute} is set {ops.name!r}, registered as {name!r}")
    return ops


def registered(ops: Ops) -> bool:
    """True when ``ops`` is the registered set of its name (not a variant made with
    :meth:`Ops.with_plan` or ``dataclasses.replace``, which keep the name)."""
    return ops.name in REGISTRY and get(ops.name) is ops
