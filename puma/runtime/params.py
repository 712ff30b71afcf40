"""Weights as the runtime sees them: flat ``a/b/c`` paths, each tensor read only when asked for.

:class:`LazyParams` is what the model owner shares from (``puma.models.load(..., lazy=True)``
makes one for checkpoints and presets); :func:`flatten`/:func:`unflatten` convert between
nested trees and flat paths. No model code here: the runtime depends on this module only.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from puma.errors import PumaError


def unflatten(flat: dict) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": x}} -> {"a/b": x}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


class LazyParams:
    """A model's weights as flat Flax paths, each read or made only when asked for.

    ``shapes`` are known up front (from file headers or the config); :meth:`get` produces one
    float32 tensor and checks its shape, so a caller that goes tensor by tensor never holds more
    than one in memory.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], loaders: dict[str, Callable[[], np.ndarray]], source: str):
        self.shapes = dict(shapes)
        self._loaders = loaders
        self.source = source

    def names(self) -> list[str]:
        return list(self.shapes)

    def numel(self, names=None) -> int:
        return sum(int(np.prod(self.shapes[n], dtype=np.int64)) for n in (self.shapes if names is None else names))

    def get(self, path: str) -> np.ndarray:
        value = np.ascontiguousarray(self._loaders[path](), dtype=np.float32)
        if value.shape != self.shapes[path]:
            raise PumaError(f"{self.source}: tensor for {path} has shape {value.shape}, expected {self.shapes[path]}")
        return value

    def materialize(self) -> dict:
        """Every tensor, as the nested Flax tree."""
        return unflatten({path: self.get(path) for path in self.shapes})


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """One tensor of a checkpoint: its shape (from the file's header) and how to read it."""

    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
