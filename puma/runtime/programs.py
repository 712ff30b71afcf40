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


def _flat_inputs(param_avals, state_avals, secret_avals, public_avals) -> tuple[list, list, list, object]:
    """The flat inputs of a program on these avals: (flat_args, visibility, inputs, in_tree)."""
    args = (param_avals, state_avals, secret_avals, public_avals)
    flat_args, in_tree = jax.tree_util.tree_flatten(args)
    inputs = (
        [("p", n) for n in leaf_names("", param_avals)]
        + [("s", n) for n in leaf_names("", state_avals)]
        + [("i", n) for n in leaf_names("", secret_avals)]
        + [("u", n) for n in leaf_names("", public_avals)]
    )
    n_secret = len(jax.tree_util.tree_leaves((param_avals, state_avals, secret_avals)))
    visibility = [libspu.Visibility.VIS_SECRET] * n_secret + [libspu.Visibility.VIS_PUBLIC] * (
        len(flat_args) - n_secret
    )
    return flat_args, visibility, inputs, in_tree


def lower(program: Program, param_avals, state_avals, secret_avals, public_avals) -> Lowered:
    """``program`` as one flat function of its flat inputs, with their visibilities and names."""
    args = (param_avals, state_avals, secret_avals, public_avals)
    flat_args, visibility, inputs, in_tree = _flat_inputs(*args)
    reveal_avals, new_state_avals = jax.eval_shape(program.fn, *args)
    reveal_leaves, reveal_tree = jax.tree_util.tree_flatten(reveal_avals)

    def flat_fn(*flat):
        p, s, sec, pub = jax.tree_util.tree_unflatten(in_tree, flat)
        reveal, new_state = program.fn(p, s, sec, pub)
        return jax.tree_util.tree_leaves(reveal) + jax.tree_util.tree_leaves(new_state)

    outputs = [("o", str(i)) for i in range(len(reveal_leaves))] + [("s", n) for n in leaf_names("", new_state_avals)]
    new_state = dict(new_state_avals) if jax.tree_util.tree_leaves(new_state_avals) else None
    return Lowered(flat_fn, flat_args, visibility, inputs, outputs, reveal_tree, len(reveal_leaves), new_state)


def _tree_doc(tree):
    """A pytree of dicts, tuples and lists with aval leaves as JSON, or None for other nodes."""
    if isinstance(tree, dict):
        items = {str(k): _tree_doc(v) for k, v in tree.items()}
        plain = all(isinstance(k, str) for k in tree) and all(v is not None for v in items.values())
        return {"d": items} if plain else None
    if isinstance(tree, (tuple, list)):
        items = [_tree_doc(v) for v in tree]
        return None if any(v is None for v in items) else {"t" if isinstance(tree, tuple) else "l": items}
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return {"a": [list(tree.shape), str(tree.dtype)]}
    return None


def _tree_from_doc(doc):
    """The pytree :func:`_tree_doc` wrote (leaves as ShapeDtypeStruct); ValueError otherwise."""
    if not isinstance(doc, dict) or len(doc) != 1:
        raise ValueError("not a tree document")
    ((kind, body),) = doc.items()
    if kind == "d" and isinstance(body, dict):
        return {k: _tree_from_doc(v) for k, v in body.items()}
    if kind in ("t", "l") and isinstance(body, list):
        items = [_tree_from_doc(v) for v in body]
        return tuple(items) if kind == "t" else items
    if kind == "a" and isinstance(body, list) and len(body) == 2:
        return jax.ShapeDtypeStruct(tuple(int(d) for d in body[0]), np.dtype(body[1]))
    raise ValueError(f"bad tree node {kind!r}")


def signature_doc(lowered: Lowered) -> dict | None:
    """What :func:`from_signature` needs to rebuild ``lowered`` without a trace, as JSON: the
    revealed tree, the outputs and the new state's tree; None when a tree holds other nodes
    than dicts, tuples and lists (it could not be rebuilt)."""
    leaf = jax.ShapeDtypeStruct((), np.float32)
    reveal = _tree_doc(jax.tree_util.tree_unflatten(lowered.reveal_tree, [leaf] * lowered.reveal_count))
    state = None if lowered.state_avals is None else _tree_doc(lowered.state_avals)
    if reveal is None or (lowered.state_avals is not None and state is None):
        return None
    return {"reveal": reveal, "outputs": [list(o) for o in lowered.outputs], "state": state}


def from_signature(doc: dict, param_avals, state_avals, secret_avals, public_avals) -> Lowered:
    """The :class:`Lowered` (without a function: it is compiled already) a :func:`signature_doc`
    describes on these input avals; ValueError when the document does not fit them."""
    flat_args, visibility, inputs, _ = _flat_inputs(param_avals, state_avals, secret_avals, public_avals)
    reveal_leaves, reveal_tree = jax.tree_util.tree_flatten(_tree_from_doc(doc["reveal"]))
    new_state = None if doc["state"] is None else _tree_from_doc(doc["state"])
    outputs = [(str(kind), str(name)) for kind, name in doc["outputs"]]
    expected = [("o", str(i)) for i in range(len(reveal_leaves))] + [
        ("s", n) for n in leaf_names("", new_state if new_state is not None else {})
    ]
    if outputs != expected:
        raise ValueError("outputs do not match the revealed tree and the state")
    return Lowered(None, flat_args, visibility, inputs, outputs, reveal_tree, len(reveal_leaves), new_state)


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
    return compile_keyed(name, fn, flat_args, visibility, compiler_options, cache)[0]


def compile_keyed(
    name: str, fn, flat_args: list, visibility: list, compiler_options, cache: str | None
) -> tuple[bytes, str | None]:
    """:func:`compile_code` and the code's cache entry key (None without a cache)."""
    lowered = spu_lowering(fn, flat_args)

    def build() -> bytes:
        hlo = lowered.compiler_ir("hlo").as_serialized_hlo_module_proto()
        # libspu.compile itself: spu.api.compile's LRU cache keys on these objects' identities, and
        # after 128 programs in one process it evicted keys whose ids were reused (KeyError).
        return libspu.compile(libspu.CompilationSource(libspu.SourceIRType.XLA, hlo, visibility), compiler_options)

    if cache is None:
        return build(), None
    entry = compile_cache.key(lowered.as_text(), flat_args, visibility, compiler_options)
    return compile_cache.code(cache, name, entry, build), entry


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
