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
    approximation set); compiled forms are cached per (key, input shapes).
    """

    name: str
    fn: Callable[[dict, dict, dict, dict], tuple[dict, dict]]
    key: tuple = ()

    def cache_key(self, params: dict, state: dict, secret: dict, public: dict) -> tuple:
        return (self.name, self.key, _signature(params), _signature(state), _signature(secret), _signature(public))


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (str(treedef),) + tuple(
        (tuple(np.shape(x)), str(np.asarray(x).dtype) if not hasattr(x, "dtype") else str(x.dtype)) for x in leaves
    )
