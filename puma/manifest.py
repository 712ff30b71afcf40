"""A published model's manifest and what a party or a client builds from it.

The **manifest** is public and signed by the model owner (who writes it: :mod:`puma.deploy`).
Its body says what the model is and what clients may do with it:

- ``model_id``: a hash of the config and the weights files' bytes (a changed file gets a new id,
  whatever its path);
- ``family`` and ``config`` (Hugging Face field names), the weights' names and shapes;
- ``format``: the ring and fraction bits of the parties' topology, and per approximation set the
  norm shifts the calibration preflight chose for it (:mod:`puma.calibration`);
- ``policy``: the tasks clients may run (``generate``, ``logits``, ``embed``, ``classify``,
  ``encode``), what they may receive (``token``; ``logits`` only if the owner allows it, since
  logits help extract a model), and the approximation sets the parties compile;
- ``tokenizer_sha256``: the hash of the tokenizer files, which travel beside the body (clients
  need them, parties do not).

The manifest file is ``{"body": ..., "signature": hex, "tokenizer": {file: text}}``; the
signature is the owner's ECDSA signature of the body's canonical JSON
(:func:`puma.runtime.certs.canonical`). Parties verify it with the owner's certificate from
their own configuration before they store anything; clients verify it before they trust a
manifest.

Who sees what: everything here is public (config, shapes, policy, norm shifts, tokenizer); a
:class:`ModelView` holds no weight and no share. A party builds the programs a client's spec
names from it (:meth:`ModelView.program`, refused unless the owner's policy allows them), a
client its model without weights (:func:`client_model`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile

import numpy as np

from puma import protocols, tasks
from puma.errors import PumaError
from puma.models import loading
from puma.models.layers import NormShifts
from puma.models.loading import FAMILIES, LoadedModel
from puma.protocols.base import FixedPoint
from puma.runtime import certs

FORMAT = "puma-manifest/1"


def files_sha256(files: dict[str, str]) -> str:
    """The hash of the tokenizer files the owner signs (inside the body) and clients check."""
    return hashlib.sha256(certs.canonical(files)).hexdigest()


@dataclasses.dataclass
class ModelView:
    """A published model as a party (or a client) sees it: no weights, the public config, the
    owner's policy, and per set the program builder's inputs."""

    body: dict
    model_id: str
    family: str
    config: object
    policy: dict
    fixed: FixedPoint
    shifts: dict  # set -> NormShifts
    param_avals: dict
    weight_names: list[str]
    weights_prefix: str
    streamed: bool = False

    def spu_settings(self, approx: str):
        """The SPU settings set ``approx`` is compiled with."""
        return protocols.get(approx).spu

    def model(self, approx: str, tokenizer=None) -> LoadedModel:
        """The model (no weights) with the norm shifts of ``approx``."""
        return LoadedModel(self.family, self.config, None, tokenizer, self.model_id, shifts=self.shifts[approx])

    def program(self, approx: str, spec) -> object:
        """The program ``spec`` names for set ``approx``, if the owner's policy allows it."""
        if approx not in self.policy.get("approx", []):
            raise PumaError(
                f"model {self.model_id}: set {approx!r} is not published (allowed: {', '.join(self.policy['approx'])})"
            )
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict)):
            raise PumaError("a program spec is [builder, arguments]")
        if spec[0] not in tasks.BUILDERS:
            raise PumaError(
                f"model {self.model_id}: no program {spec[0]!r} (the parties build {', '.join(tasks.BUILDERS)})"
            )
        model = self.model(approx)
        task, reveal = tasks.reveals(model, spec)
        if task != "stage" and task not in self.policy.get("tasks", []):
            raise PumaError(f"model {self.model_id}: the owner's policy does not allow the task {task!r}")
        if reveal is not None and reveal not in self.policy.get("reveal", []):
            raise PumaError(f"model {self.model_id}: the owner's policy does not let clients receive {reveal}")
        try:
            return tasks.build(model, protocols.get(approx), spec)
        except ValueError as err:
            raise PumaError(f"model {self.model_id}: {err}") from None


def view(body: dict) -> ModelView:
    """The :class:`ModelView` of a manifest body, checked field by field."""
    try:
        if body.get("format") != FORMAT:
            raise ValueError(f"format {body.get('format')!r}, expected {FORMAT!r}")
        family = FAMILIES[body["family"]]
        config = family.config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in body["config"].items()})
        fixed = FixedPoint(body["fixed_point"]["field"], int(body["fixed_point"]["fxp_bits"]))
        shifts = {
            name: NormShifts(tuple((str(site), int(k)) for site, k in plan["shifts"]))
            for name, plan in body["fixed_point"]["plans"].items()
        }
        policy = body["policy"]
        model_key = str(body["model_id"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise PumaError(f"not a puma manifest: {err}") from None
    shapes = loading.param_shapes(family.name, config)
    if {k: list(v) for k, v in shapes.items()} != body.get("weights"):
        raise PumaError(f"manifest of {model_key}: its weights do not match its config")
    import jax

    avals = {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()}
    from puma.runtime.params import unflatten

    return ModelView(
        body, model_key, family.name, config, policy, fixed, shifts, unflatten(avals), list(shapes), f"p:{model_key}:"
    )


# -- the manifest file, as a client holds it ---------------------------------------------------------


def read_manifest(path: str) -> tuple[dict, bytes, dict[str, str]]:
    """(body, signature, tokenizer files) of a manifest file, the tokenizer checked against the
    body's hash."""
    try:
        with open(path) as f:
            doc = json.load(f)
        body, signature, files = doc["body"], bytes.fromhex(doc["signature"]), doc.get("tokenizer") or {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PumaError(f"{path}: not a puma manifest ({err})") from None
    if files and files_sha256(files) != body.get("tokenizer_sha256"):
        raise PumaError(f"{path}: its tokenizer files do not match the hash the owner signed")
    return body, signature, files


def is_manifest(path: str) -> bool:
    """Whether ``path`` is a manifest file (a JSON file with a signed body)."""
    if not (isinstance(path, str) and path.endswith(".json") and os.path.isfile(path)):
        return False
    try:
        with open(path) as f:
            head = f.read(64)
    except OSError:
        return False
    return head.lstrip().startswith('{"body"')


def tokenizer_from(files: dict[str, str]):
    """The tokenizer the manifest's files describe (None without any)."""
    if not files:
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            if os.sep in name or name.startswith("."):
                raise PumaError(f"manifest tokenizer file {name!r} is not a plain file name")
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(text)
        return AutoTokenizer.from_pretrained(folder)


def client_model(manifest: str, approx: str, topology=None) -> tuple[ModelView, LoadedModel]:
    """What a client runs on: the manifest's view and the model (config, tokenizer, the norm
    shifts of ``approx``; no weights). With a ``topology``, the owner's signature is checked
    against the owner's certificate from it."""

    body, signature, files = read_manifest(manifest)
    if topology is not None and topology.tls is not None:
        cert = topology.tls.owner(topology.owner)[0]
        if os.path.exists(cert) and not certs.verify(cert, certs.canonical(body), signature):
            raise PumaError(f"{manifest} is not signed by the owner of {topology.source}")
    model_view = view(body)
    if approx not in model_view.policy.get("approx", []):
        raise PumaError(
            f"{manifest}: the owner published the sets {', '.join(model_view.policy['approx'])}, not {approx!r}"
        )
    return model_view, model_view.model(approx, tokenizer_from(files))
