"""Programs as SPU runs them: lowered to one flat function and compiled to pphlo code.

Whoever compiles (the driver on ``sim`` and ``ray``, each computing party on ``nodes``) lowers a
:class:`~puma.program.Program` the same way, so the code and the order of its inputs and outputs
agree everywhere: weights ``p``, state ``s``, secret inputs ``i``, public inputs ``u``; revealed
outputs ``o`` then new state ``s``. Names at the parties are bound per run (:func:`bound`).
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import numpy as np
import spu.libspu as libspu
from spu import api as spu_api
from spu.utils import frontend as spu_fe

from puma.program import Program
from puma.runtime import compile_cache


@dataclasses.dataclass
class Lowered:
    """A program's flat signature: what :func:`compile_code` compiles and how runs bind it."""

    fn: object  # flat function of flat_args
    flat_args: list
    visibility: list
    inputs: list[tuple[str, str]]  # (kind, local name): "p" weights, "s" state, "i" secret, "u" public
    outputs: list[tuple[str, str]]  # ("o", index) revealed, ("s", local name) new state
    reveal_tree: object
    reveal_count: int
    state_avals: dict | None  # the new state entries' avals, or None


def avals(tree):
    """Shapes and dtypes of a tree of arrays (or of avals)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype), tree
    )


def leaf_names(prefix: str, tree) -> list[str]:
    """``prefix`` + the slash-joined path of every leaf of ``tree``, in flattening order."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [prefix + "/".join(_key_str(k) for k in path) for path, _ in paths]


def _key_str(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flat_named(tree: dict) -> dict[str, np.ndarray]:
    """{"a": x, "b": {"c": y}} -> {"a": x, "b/c": y} in the order :func:`leaf_names` uses."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_str(k) for k in path): np.asarray(v) for path, v in leaves}


#: dtypes a client's inputs may have.
DTYPES = ("float32", "int32", "bool", "uint8", "int64", "float64")


def flat_named_avals(tree) -> dict:
    """{"a": x, "b": {"c": y}} -> {"a": aval, "b/c": aval}."""
    leaves = jax.tree_util.tree_flatten_with_path(avals(tree))[0]
    return {"/".join(_key_str(k) for k in path): v for path, v in leaves}


def avals_from_flat(doc, what: str = "avals") -> dict:
    """The nested tree of avals a flat ``{path: [shape, dtype]}`` describes, checked."""
    from puma.runtime.messages import MessageError, name
    from puma.runtime.params import unflatten

    if not isinstance(doc, dict):
        raise MessageError(f"{what} must map input names to [shape, dtype]")
    flat = {}
    for path, entry in doc.items():
        name(path, f"{what} name")
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)):
            raise MessageError(f"{what}[{path}] must be [shape, dtype]")
        shape, dtype = entry
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape) or len(shape) > 8:
            raise MessageError(f"{what}[{path}]: bad shape {shape!r}")
        if dtype not in DTYPES:
            raise MessageError(f"{what}[{path}]: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        flat[path] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
    return unflatten(flat)


def lower(program: Program, param_avals, state_avals, secret_avals, public_avals) -> Lowered:
    """``program`` as one flat function of its flat inputs, with their visibilities and names."""
    args = (param_avals, state_avals, secret_avals, public_avals)
    flat_args, in_tree = jax.tree_util.tree_flatten(args)
    reveal_avals, new_state_avals = jax.eval_shape(program.fn, *args)
    reveal_leaves, reveal_tree = jax.tree_util.tree_flatten(reveal_avals)

    def flat_fn(*flat):
        p, s, sec, pub = jax.tree_util.tree_unflatten(in_tree, flat)
        reveal, new_state = program.fn(p, s, sec, pub)
        return jax.tree_util.tree_leaves(reveal) + jax.tree_util.tree_leaves(new_state)

    inputs = (
        [("p", n) for n in leaf_names("", param_avals)]
        + [("s", n) for n in leaf_names("", state_avals)]
        + [("i", n) for n in leaf_names("", secret_avals)]
        + [("u", n) for n in leaf_names("", public_avals)]
    )
    outputs = [("o", str(i)) for i in range(len(reveal_leaves))] + [("s", n) for n in leaf_names("", new_state_avals)]
    n_secret = len(jax.tree_util.tree_leaves((param_avals, state_avals, secret_avals)))
    visibility = [libspu.Visibility.VIS_SECRET] * n_secret + [libspu.Visibility.VIS_PUBLIC] * (
        len(flat_args) - n_secret
    )
    new_state = dict(new_state_avals) if jax.tree_util.tree_leaves(new_state_avals) else None
    return Lowered(flat_fn, flat_args, visibility, inputs, outputs, reveal_tree, len(reveal_leaves), new_state)


def spu_lowering(fn, flat_args: list):
    """``fn`` lowered the way SPU's frontend lowers it (under its lock and its patches of JAX, for
    its interpreter platform, unused inputs kept). The key of the compile cache is read from this
    same lowering: JAX reuses traces between lowerings of one function, so lowering it any other
    way first would change what SPU compiles (a sort's float canonicalization, unpatched)."""
    with spu_fe._jax_lock:
        patches = spu_fe._patch_jax()
        try:
            return jax.jit(fn, keep_unused=True).trace(*flat_args).lower(lowering_platforms=("interpreter",))
        finally:
            spu_fe._restore_jax_patch(patches)


def compile_code(name: str, fn, flat_args: list, visibility: list, compiler_options, cache: str | None) -> bytes:
    """SPU's pphlo code for program ``name`` (``fn`` on ``flat_args`` with their visibilities);
    from the compile cache folder ``cache`` when it holds this lowering's code, else compiled (and
    kept there). ``cache`` None: always compiled (see :mod:`puma.runtime.compile_cache`)."""
    lowered = spu_lowering(fn, flat_args)

    def build() -> bytes:
        hlo = lowered.compiler_ir("hlo").as_serialized_hlo_module_proto()
        return spu_api.compile(libspu.CompilationSource(libspu.SourceIRType.XLA, hlo, visibility), compiler_options)

    if cache is None:
        return build()
    entry = compile_cache.key(lowered.as_text(), flat_args, visibility, compiler_options)
    return compile_cache.code(cache, name, entry, build)


def code_key(name: str, code: bytes) -> str:
    """The key an installed program is known by: its name and a hash of its code."""
    return f"{name}-{hashlib.sha1(code).hexdigest()[:12]}"


def bound(kind: str, local: str, slot: str, bind: dict, weights: str = "p:") -> str:
    """The party-side name of a program input/output: local top-level names bound per run;
    weights under ``weights`` (a model's prefix), state under ``s:<slot>:``."""
    if kind in ("i", "u", "o"):
        return f"{kind}:{local}"
    top, sep, rest = local.partition("/")
    name = bind.get(top, top) + sep + rest
    return f"{weights}{name}" if kind == "p" else f"s:{slot}:{name}"
