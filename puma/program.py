"""Programs: the functions a backend evaluates, with who provides each input.

A :class:`Program` wraps ``fn(params, state, secret, public) -> (reveal, new_state)``:

- ``params``: the model owner's weights (secret at the computing parties);
- ``state``: named values that stay inside the backend between runs (the key/value cache),
  secret at the parties and never revealed;
- ``secret``: the client's private inputs (token ids, token types);
- ``public``: values every party may see (attention mask, positions: the lengths);
- ``reveal``: what the client receives; ``new_state``: what stays inside.

All four are flat ``{name: array}`` dicts (params is the nested Flax tree). The same program runs
in plaintext (``jax.jit``) and under SPU, so task code is written once.

Stage programs (one decoder block, the embedding, the head) take only part of the weights and
of the state: ``param_keys`` names the top-level parameter subtrees the function receives and
``state_reads`` the state entries it reads (its new state is merged into the slot). A run binds
these local names to the session's names (``bind={"layer": "layers_3"}``), so one compiled
block serves every layer of the same shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

Array = Any


@dataclasses.dataclass(frozen=True)
class Program:
    """A named function ``fn(params, state, secret, public) -> (reveal, new_state)``.

    ``key`` distinguishes programs that share a name but not a trace (for example the
    approximation set); compiled forms are cached per (key, input shapes). ``spec`` says how
    to build the program again from the model and the set: ``(builder, arguments)`` with a
    builder of :data:`puma.tasks.BUILDERS` and JSON arguments; computing parties that compile
    their own programs (the ``nodes`` backend) receive the spec, never code. A program without
    one (a benchmark's function) runs only where the driver may install code (``sim``, ``ray``).
    """

    name: str
    fn: Callable[[dict, dict, dict, dict], tuple[dict, dict]]
    key: tuple = ()
    spec: tuple | None = None
    param_keys: tuple[str, ...] | None = None  # top-level weight subtrees it takes (None: all)
    state_reads: tuple[str, ...] | None = None  # state entries it reads (None: the whole slot)
    builtin: bool = False  # built by puma's own builders with a registered set: ``key`` and the
    # shapes decide its trace (the compile cache may skip the trace; see puma.runtime.compile_cache)

    def select_params(self, params: dict, bind: dict) -> dict:
        """The weights this program takes, under its local names."""
        if self.param_keys is None:
            return params
        return {k: params[bind.get(k, k)] for k in self.param_keys}

    def select_state(self, state: dict, bind: dict) -> dict:
        """The state entries this program reads, under its local names."""
        if self.state_reads is None:
            return state
        return {k: state[bind.get(k, k)] for k in self.state_reads}

    def cache_key(self, params: dict, state: dict, secret: dict, public: dict) -> tuple:
        return (self.name, self.key, _signature(params), _signature(state), _signature(secret), _signature(public))


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (str(treedef),) + tuple(
        (tuple(np.shape(x)), str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype)) for x in leaves
    )
