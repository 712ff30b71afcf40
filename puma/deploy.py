"""The model owner's side of a deployment to parties that are separate trust domains: the model
id, the manifest body it signs, publishing shares into each party's own store, and removing them.

What a manifest holds and what parties and clients build from it is :mod:`puma.manifest`. The
owner calibrates the model, writes the manifest body (policy included), signs its canonical JSON
with the owner's key (:func:`puma.runtime.certs.canonical`) and sends each party only that
party's pieces of the weights; it reads nothing back but each party's receipt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time

import numpy as np

from puma import calibration, protocols
from puma.errors import PumaError
from puma.manifest import FORMAT, files_sha256, read_manifest
from puma.models import load, loading
from puma.models.loading import LoadedModel
from puma.protocols.base import FixedPoint
from puma.runtime import certs, sharing

log = logging.getLogger(__name__)

#: Tasks a policy may allow, by family kind; what each reveals (see :func:`puma.tasks.reveals`).
TASKS = {"causal": ("generate", "logits"), "encoder": ("embed", "classify", "encode")}
REVEALS = ("token", "logits", "outputs")
#: Sets published by default: each is compiled by the parties only if a client asks for it.
DEFAULT_SETS = protocols.PUBLISHED


def model_id(source: str, overrides: dict | None = None, seed: int = 0) -> str:
    """The model's id: SHA-256 of its config and its weights files' bytes (for a preset: its
    name, seed and overrides, which make its weights)."""
    digest = hashlib.sha256()
    if source in loading.ALIASES:
        source = loading.ALIASES[source]()
    if source in loading.presets():
        digest.update(json.dumps(["preset", source, seed, sorted((overrides or {}).items())]).encode())
        return digest.hexdigest()[:32]
    path = os.path.realpath(os.path.expanduser(source))
    if not os.path.exists(path):
        raise PumaError(f"model {source!r} not found")
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    for file in files:
        name = os.path.basename(file)
        if os.path.isfile(file) and (
            name == "config.json" or name.endswith((".safetensors", ".bin", ".gguf")) or file == path
        ):
            if os.path.isdir(path):  # a folder's files are told apart by name; a file is its bytes
                digest.update(name.encode() + b"\0")
            with open(file, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
    return digest.hexdigest()[:32]


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The tokenizer as the text files ``save_pretrained`` writes (empty without one)."""
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        out = {}
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                out[name] = f.read()
        return out


def default_policy(model: LoadedModel, sets) -> dict:
    """What clients may do unless the owner says otherwise: the family's tasks, tokens (and an
    encoder's outputs) but no logits, the given sets."""
    kind = "causal" if model.causal else "encoder"
    tasks_allowed = [t for t in TASKS[kind] if t != "logits"]
    if kind == "encoder" and not model.config.has_classifier:
        tasks_allowed.remove("classify")
    return {"tasks": tasks_allowed, "reveal": ["token", "outputs"], "approx": list(sets)}


def manifest_body(
    source: str,
    fixed: FixedPoint,
    sets=DEFAULT_SETS,
    policy: dict | None = None,
    owner: str = "owner",
    overrides: dict | None = None,
) -> tuple[dict, dict[str, str]]:
    """The manifest body for ``source`` published at format ``fixed``, and the tokenizer files.

    Calibrates the model (cached) and keeps the sets whose plan holds at ``fixed``; a set that
    would compute the model wrong there is left out with a warning (none left: refused).
    """
    model = load(source, overrides=overrides, weights=False)
    ranges = calibration.ranges_for(source, overrides)
    plans, refused = {}, []
    for name in sets:
        plan = calibration.plan(ranges, protocols.get(name), fixed, model.config.activation)
        if plan.ok:
            plans[name] = {"shifts": [list(site) for site in plan.shifts.sites]}
        else:
            refused.append(f"{name}: {plan.findings[0].line()}")
    for line in refused:
        log.warning("not published with %s", line)
    if not plans:
        raise PumaError(f"no approximation set computes this model right at {fixed.describe()}: {refused[0]}")
    policy = dict(policy or default_policy(model, list(plans)))
    policy["approx"] = [s for s in policy.get("approx", list(plans)) if s in plans]
    files = tokenizer_files(model.tokenizer)
    body = {
        "format": FORMAT,
        "model_id": model_id(source, overrides),
        "family": model.family,
        "config": _config_json(model.config),
        "weights": {k: list(v) for k, v in loading.param_shapes(model.family, model.config).items()},
        "fixed_point": {"field": fixed.field, "fxp_bits": fixed.fxp_bits, "plans": plans},
        "policy": policy,
        "tokenizer_sha256": files_sha256(files) if files else None,
        "owner": owner,
        "issued": int(time.time()),
    }
    return body, files


def _config_json(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


# -- the owner ------------------------------------------------------------------------------------


def write_manifest(path: str, body: dict, signature: bytes, files: dict[str, str]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump({"body": body, "signature": signature.hex(), "tokenizer": files}, f)
    os.replace(path + ".tmp", path)


def publish(mesh, source: str, body: dict, signature: bytes, overrides: dict | None = None) -> dict:
    """Share the weights of ``source`` into every party's own store under the manifest
    ``body``: ``publish``, the weights tensor by tensor and chunk by chunk (each party gets
    only its own pieces), ``publish_end``. Returns what the parties stored."""
    from puma.runtime.roles import PartyShares

    fixed = FixedPoint(body["fixed_point"]["field"], int(body["fixed_point"]["fxp_bits"]))
    protocol = mesh.topology.protocol.protocol
    model = load(source, overrides=overrides, lazy=True)
    mesh.broadcast("publish", manifest=body, signature=signature)
    mid = body["model_id"]
    sent = 0
    names = model.lazy.names()
    owner_private = mesh.topology.client_server
    for i, name in enumerate(names):
        for parts in _pieces(model.lazy.get(name), fixed, protocol, mesh.world_size, owner_private):
            if owner_private:  # the owner's own party keeps the weight; the client's makes a placeholder
                sent += parts[0].nbytes
                bundles = [PartyShares(0, {f"p:{name}": parts[0]})]
            else:
                sent += sum(p.nbytes for p in parts)
                bundles = [PartyShares(r, {f"p:{name}": parts[r]}) for r in range(mesh.world_size)]
            mesh.call("publish_weights", [{"model": mid, "bundle": b} for b in bundles])
        if (i + 1) % 50 == 0:
            log.info("published %d of %d tensors", i + 1, len(names))
    ends = mesh.broadcast("publish_end", model=mid)
    return {"model_id": mid, "owner_sent_bytes": sent, "parties": ends}


def _pieces(value: np.ndarray, fixed: FixedPoint, protocol: str, world_size: int, owner_private: bool):
    """The owner's shares of one tensor, chunk by chunk, as compact pieces
    (:func:`puma.runtime.sharing.pieces`; ``owner_private``: client-server mode)."""
    if not sharing.supported(protocol, fixed.field, world_size):
        raise PumaError(f"publishing needs ABY3 (three parties) or cheetah (two), FM64 or FM128; not {protocol}")
    yield from sharing.pieces(value, fixed.field, fixed.fxp_bits, protocol=protocol, owner_private=owner_private)


def publish_to(
    topology_path: str,
    source: str,
    out: str,
    sets=DEFAULT_SETS,
    policy: dict | None = None,
    overrides: dict | None = None,
) -> dict:
    """``puma owner publish``: calibrate ``source``, sign its manifest with the owner's key,
    share its weights into the stores of the parties of ``topology_path`` and write the
    manifest to ``out``. Returns what the parties stored and the seconds it took."""
    from puma.runtime.config import Topology
    from puma.runtime.nodes import OWNER, NodesMesh

    topology = Topology.from_yaml(topology_path)
    protocol = topology.protocol
    if not sharing.supported(protocol.protocol, protocol.field, topology.world_size):
        raise PumaError(
            f"{topology_path}: publishing needs ABY3 (three parties) or cheetah (two), FM64 or FM128 "
            f"({protocol.describe()} given)"
        )
    tls = topology.require_tls()
    key = tls.owner(topology.owner)[1]
    start = time.perf_counter()
    fixed = FixedPoint(protocol.field, protocol.fxp_bits)
    body, files = manifest_body(source, fixed, sets, policy, topology.owner, overrides)
    signature = certs.sign(key, certs.canonical(body))
    mesh = NodesMesh(topology, OWNER)
    try:
        stored = publish(mesh, source, body, signature, overrides)
    finally:
        mesh.close()
    write_manifest(out, body, signature, files)
    return {**stored, "seconds": round(time.perf_counter() - start, 2), "manifest": out}


def ensure_published(topology_path: str, source: str, approx: str, overrides: dict | None = None) -> str:
    """For a driver that holds the owner's key as well as a client's (one developer's machine):
    publish ``source`` to the parties unless they hold it already, and return its manifest (kept
    in the cache folder). The owner's own runs may use every task and receive logits."""
    from puma.runtime.config import Topology
    from puma.runtime.nodes import OWNER, NodesMesh

    topology = Topology.from_yaml(topology_path)
    key = hashlib.sha256(f"{os.path.realpath(topology_path)}:{model_id(source, overrides)}".encode()).hexdigest()[:20]
    path = os.path.join(calibration.cache_dir(), "..", "manifests", f"{key}.json")
    if os.path.exists(path):
        body, _, _ = read_manifest(path)
        sets_ok = approx in body["policy"]["approx"]
        mesh = NodesMesh(topology, OWNER)
        try:
            if sets_ok and all(s["published"] for s in mesh.broadcast("status", model=body["model_id"])):
                return path
        finally:
            mesh.close()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model = load(source, overrides=overrides, weights=False)
    sets = list(dict.fromkeys([*DEFAULT_SETS, approx]))
    kind = "causal" if model.causal else "encoder"
    policy = {"tasks": list(TASKS[kind]), "reveal": list(REVEALS), "approx": sets}
    publish_to(topology_path, source, path, sets, policy, overrides)
    return path


def unpublish_from(topology_path: str, manifest: str) -> list:
    """``puma owner unpublish``: remove the manifest's model from every party's store."""
    from puma.runtime.config import Topology
    from puma.runtime.nodes import OWNER, NodesMesh

    body, _, _ = read_manifest(manifest)
    mesh = NodesMesh(Topology.from_yaml(topology_path), OWNER)
    try:
        return mesh.broadcast("unpublish", model=body["model_id"])
    finally:
        mesh.close()
