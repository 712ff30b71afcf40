"""Calibration: the ranges a model's activations take, and the fixed-point settings they allow.

Fixed point holds a value v as round(v 2^f) in a ring of 64 (or 128) bits, and a product is
formed at 2f fraction bits before it is truncated: at FM64 with 18 fraction bits every product,
and every sum of products a matrix product forms, must stay below 2^26
(:class:`~puma.protocols.base.FixedPoint`). Real LLMs break that: SmolLM2-135M's residual
stream reaches |h| = 22 552 on its first token from layer 11 on, and RMSNorm's sum of squares of
such a row is 5.2e8. Random presets have no such outliers.

So before a secure run the model owner makes one plaintext pass over a few calibration inputs
(:data:`TEXTS`, tokenized as a prompt is; random ids for models without a tokenizer) and records,
at every site that multiplies activations, the largest magnitude and the smallest and largest
mean square of a row (:func:`puma.models.layers.record`). These ranges are a property of the
model, like its config: public to the parties, cached per model (:func:`ranges_for`). Then
:func:`plan` checks them, scaled by :data:`MARGIN`, against the bounds of a format:

- a norm's input is pre-scaled by 2^-k (:func:`~puma.protocols.base.prescale`), with k the
  smallest shift that keeps its sum of squares below the product limit and its reciprocal square
  root at :data:`PRECISION_BITS` significant bits, and the shift must leave the smallest row's
  mean square resolved to that many bits (and inside the set's ``variance_domain``);
- attention scores, every matrix product's output, the gated product, norm outputs and logits
  stay below the product limit; the residual stream below the value limit;
- the feed-forward activation's input stays below the ``input_limit`` of the chosen set's
  activation, and every attention row's maximum below that of its softmax.

:func:`choose` returns the plan for the format asked for, or refuses it in one line naming the
site, the value, the bound and a format that works; asked for none, it takes the first safe
format of :data:`FORMATS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Iterable

import jax
import numpy as np

from puma import progress
from puma.errors import PumaError
from puma.models.layers import RANGES, NormShifts
from puma.models.loading import LoadedModel
from puma.protocols import Ops
from puma.protocols.base import FixedPoint
from puma.runtime.params import flatten, unflatten

log = logging.getLogger(__name__)

#: Bump when what is recorded or how it is measured changes: cached ranges are then remade.
VERSION = 2
#: Calibrated magnitudes are multiplied by this before they are checked (inputs other than the
#: calibration texts may go further); mean squares by its square.
MARGIN = 2.0
#: Significant bits a norm's mean square and its reciprocal square root must keep.
PRECISION_BITS = 8
#: Norm shifts tried: 2^-k for k from MIN_SHIFT (enlarging small rows) to MAX_SHIFT.
MIN_SHIFT, MAX_SHIFT = -8, 24
#: Tokens per calibration input at most.
MAX_TOKENS = 64
#: Formats tried in order when none is asked for: FM64 costs half of FM128's bytes; fewer
#: fraction bits widen the range a norm's rows may span (its window is 2^(62 - f - p) / n).
FORMATS = (FixedPoint("FM64", 18), FixedPoint("FM64", 16), FixedPoint("FM128", 26))

#: Calibration texts: prose, a factual sentence, dialogue and code, so that the sites see
#: ordinary activations and the outliers models put on their first tokens and delimiters.
TEXTS = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
    "with her friends. One day, she saw a big red ball under a tree and ran to get it.",
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and the "
    "river Seine, and about two million people live in the city itself.",
    "User: Can you explain what a neural network is?\nAssistant: A neural network is a model made "
    "of layers of simple units; each layer transforms its input and passes it on.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])",
)

#: What norms record: their input (a LayerNorm's centred), named after the ops function.
NORM_INPUTS = ("layer_norm_input", "rms_norm_input")
#: Statistics of a site: (largest |x|, smallest row mean square, largest row mean square, row width).
Stats = tuple


@dataclasses.dataclass
class Ranges:
    """Calibrated statistics per site (a Flax path plus what was recorded there, e.g.
    ``layers_11/input_layernorm/rms_norm_input``), in the order the model runs them."""

    model: str
    inputs: str
    sites: dict[str, Stats]

    def to_json(self) -> dict:
        return {"version": VERSION, "model": self.model, "inputs": self.inputs, "sites": self.sites}

    @classmethod
    def from_json(cls, doc: dict) -> "Ranges":
        if doc.get("version") != VERSION:
            raise ValueError(f"calibration version {doc.get('version')}, expected {VERSION}")
        return cls(doc["model"], doc["inputs"], {k: tuple(v) for k, v in doc["sites"].items()})

    def largest(self, kind: str) -> tuple[str, float]:
        """The site of this kind (last path part) with the largest magnitude, and that magnitude."""
        found = [(s[0], name) for name, s in self.sites.items() if name.rsplit("/", 1)[-1] == kind]
        value, name = max(found, default=(0.0, ""))
        return name, value


# -- measuring ------------------------------------------------------------------------------


def calibration_ids(model: LoadedModel, seed: int = 0) -> list[list[int]]:
    """The calibration inputs as token lists: :data:`TEXTS` tokenized (with the tokenizer's own
    special tokens), or seeded random ids for a model without a tokenizer."""
    limit = min(MAX_TOKENS, model.config.max_positions)
    if model.tokenizer is not None:
        return [list(model.tokenizer(text)["input_ids"])[:limit] for text in TEXTS]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, model.config.vocab_size, size=limit).tolist() for _ in range(2)]


def measure(model: LoadedModel, batches: list[list[int]]) -> dict[str, Stats]:
    """Run ``model`` (with ``model.lazy`` weights) in plaintext, stage by stage, over each token
    list and collect the statistics every site records; weights are read one stage at a time."""
    module = model.module("exact")
    stages = module.stages()  # an encoder's for its widest head
    lazy = model.lazy
    sites: dict[str, list] = {}

    def weights(keys: Iterable[str]) -> dict:
        keys = set(keys)
        return unflatten({n: lazy.get(n) for n in lazy.names() if n.split("/", 1)[0] in keys})

    def run(params, *args, method):
        out, collected = module.apply({"params": params}, *args, method=method, mutable=[RANGES])
        for name, values in flatten(jax.device_get(collected.get(RANGES, {}))).items():
            sites.setdefault(name, []).extend(np.asarray(v, np.float64) for v in values)
        return out

    inputs = []
    for ids in batches:
        ids = np.asarray([ids], np.int32)  # [1, T]
        secret = {"input_ids": ids, "token_type_ids": np.zeros_like(ids)}
        public = {"position_ids": np.arange(ids.shape[1], dtype=np.int32)[None], "attention_mask": np.ones_like(ids)}
        inputs.append((secret, public))
    params = weights(stages.embed)
    hidden = [run(params, secret, public, method="stage_embed") for secret, public in inputs]
    for layer in range(stages.layers):
        params = weights([stages.layer_key(layer)])
        hidden = [
            run(params, h, public, None, layer, "forward", 0, None, method="stage_block")[0]
            for h, (_, public) in zip(hidden, inputs)
        ]
    params = weights(stages.head)
    for h, (_, public) in zip(hidden, inputs):
        run(params, h, public, None, method="stage_head")
    return {
        name: (
            float(max(v[0] for v in values)),
            float(min(v[1] for v in values)),
            float(max(v[2] for v in values)),
            int(values[0][3]),
        )
        for name, values in sites.items()
    }


def fingerprint(source: str, overrides: dict | None = None, seed: int = 0) -> str:
    """What identifies a model's weights for the cache: a preset's name, seed and overrides, or
    a file's (a folder's files') resolved path, size and modification time."""
    from puma.models import loading

    if source in loading.presets():
        parts = ["preset", source, seed, sorted((overrides or {}).items())]
    else:
        path = os.path.realpath(os.path.expanduser(loading.ALIASES[source]() if source in loading.ALIASES else source))
        files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
        parts = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files if os.path.isfile(f)]
    return hashlib.sha256(json.dumps([VERSION, parts], default=str).encode()).hexdigest()[:20]


def cache_root() -> str:
    """puma's cache folder: ``$PUMA_CACHE`` (default ``~/.cache/puma``), with a subfolder per
    kind of entry (calibrated ranges, manifests, compiled programs)."""
    return os.environ.get("PUMA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "puma")


def cache_dir() -> str:
    """Where calibrated ranges are kept: ``<cache_root()>/calibration``."""
    return os.path.join(cache_root(), "calibration")


def ranges_for(source: str, overrides: dict | None = None, seed: int = 0, refresh: bool = False) -> Ranges:
    """The calibrated ranges of a model (the owner's plaintext pass; see the module doc), from
    the cache when this model was calibrated before."""
    from puma.models import load

    key = fingerprint(source, overrides, seed)
    path = os.path.join(cache_dir(), f"{key}.json")
    if not refresh and os.path.exists(path):
        try:
            with open(path) as f:
                return Ranges.from_json(json.load(f))
        except (OSError, ValueError, KeyError) as err:
            log.info("recalibrating %s: cached ranges unreadable (%s)", source, err)
    progress.status("calibrating %s (one plaintext pass over %d inputs; cached)", source, len(TEXTS))
    model = load(source, overrides=overrides, seed=seed, lazy=True)
    batches = calibration_ids(model, seed)
    sites = measure(model, batches)
    described = f"{len(batches)} {'texts' if model.tokenizer else 'random id lists'}, {sum(map(len, batches))} tokens"
    ranges = Ranges(key, described, sites)
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(ranges.to_json(), f)
        os.replace(tmp, path)
    except OSError as err:
        log.info("calibrated ranges not cached (%s)", err)
    return ranges


# -- planning -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Finding:
    """A site where a format would be wrong: ``value`` (calibrated, times the margin) against
    ``bound``; ``what`` says which quantity."""

    site: str
    what: str
    value: float
    bound: float
    above: bool = True  # the value must stay below the bound (else above it)

    def line(self) -> str:
        relation = "exceeds" if self.above else "falls below"
        return f"{self.site}: {self.what} {self.value:.3g} {relation} {self.bound:.3g}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """A format, the norm shifts it needs, and what is wrong with it (nothing when ``ok``)."""

    fixed: FixedPoint
    shifts: NormShifts
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not self.findings

    def describe(self) -> str:
        shifted = self.shifts.nonzero()
        if not shifted:
            return f"{self.fixed.describe()}, no norm pre-scaling needed"
        scales = sorted({f"2^{-k}" for k in shifted.values()}, key=lambda p: -int(p[2:]))
        return (
            f"{self.fixed.describe()}, norm inputs scaled by {', '.join(scales)} "
            f"at {len(shifted)} of {len(self.shifts.sites)} norms"
        )


def _norm_shift(name: str, stats: Stats, fixed: FixedPoint, domain) -> tuple[int, list[Finding]]:
    """The norm's shift k (2^-k; negative ones enlarge) nearest to 0 such that its sum of
    squares (times the margin) stays below the product limit, its largest mean square at most
    2^(2(f - p)) (a reciprocal square root of p significant bits) and its smallest at least
    2^(p - f) (p bits resolved), both inside ``domain``; and what is wrong when no k does all."""
    _, ms_min, ms_max, width = stats
    high, low = ms_max * MARGIN**2, ms_min / MARGIN**2
    floor = max(2.0 ** (PRECISION_BITS - fixed.fxp_bits), domain[0])
    ceiling = min(2.0 ** (2 * (fixed.fxp_bits - PRECISION_BITS)), domain[1])
    shifts = range(MIN_SHIFT, MAX_SHIFT + 1)
    fits_high = [k for k in shifts if width * high * 4.0**-k <= fixed.product_limit and high * 4.0**-k <= ceiling]
    fits_low = [k for k in shifts if low * 4.0**-k >= floor]
    if not fits_high:
        return MAX_SHIFT, [Finding(name, "sum of squares", width * high * 4.0**-MAX_SHIFT, fixed.product_limit)]
    k_high, k_low = fits_high[0], max(fits_low, default=MIN_SHIFT - 1)
    if k_high > k_low:
        return k_high, [Finding(name, f"mean square / 4^{k_high}", low * 4.0**-k_high, floor, False)]
    return min(max(0, k_high), k_low), []


def plan(ranges: Ranges, ops: Ops, fixed: FixedPoint, activation: str) -> Plan:
    """The norm shifts ``ranges`` need in format ``fixed`` with set ``ops``, and every site the
    format cannot hold (see the module doc); ``activation`` is the model's feed-forward
    activation (its Hugging Face name)."""
    act = ops.activation(activation)
    act_limit = getattr(act, "input_limit", None)
    score_limit = getattr(ops.softmax, "input_limit", None)
    shifts, findings = [], []
    for site, stats in ranges.sites.items():
        owner, kind = site.rsplit("/", 1)
        top = stats[0] * MARGIN
        if kind in NORM_INPUTS:
            norm = getattr(ops, kind.removesuffix("_input"))
            k, found = _norm_shift(owner, stats, fixed, getattr(norm, "variance_domain", (0.0, math.inf)))
            shifts.append((owner, k))
            findings += found
        elif kind == "residual":
            if top > fixed.value_limit:
                findings.append(Finding(owner, "residual value", top, fixed.value_limit))
        elif kind == "activation_input":
            if act_limit is not None and top > act_limit(fixed):
                findings.append(Finding(owner, f"{activation} input ({ops.name})", top, act_limit(fixed)))
        elif kind == "score_row_max":
            if score_limit is not None and top > score_limit(fixed):
                findings.append(Finding(owner, f"attention row maximum ({ops.name})", top, score_limit(fixed)))
        elif top > fixed.product_limit:  # scores, matrix products, gated product, norm outputs, logits
            findings.append(Finding(owner, kind.replace("_", " "), top, fixed.product_limit))
    return Plan(fixed, NormShifts(tuple(shifts)), tuple(findings))


def choose(
    ranges: Ranges,
    ops: Ops,
    activation: str,
    field: str | None = None,
    fxp_bits: int | None = None,
    locked: bool = False,
) -> Plan:
    """The plan to run with. With ``field`` or ``fxp_bits`` given (or ``locked``: the parties'
    topology fixes the format), that format or a one-line refusal naming the first site it
    cannot hold and a format that can; else the first safe format of :data:`FORMATS`."""
    safe = next((p for p in (plan(ranges, ops, f, activation) for f in FORMATS) if p.ok), None)
    if field is not None or fxp_bits is not None or locked:
        asked = FixedPoint(field or "FM64", fxp_bits if fxp_bits is not None else 18)
        chosen = plan(ranges, ops, asked, activation)
        if chosen.ok:
            return chosen
        fix = (
            f"use --field {safe.fixed.field} --fxp-bits {safe.fixed.fxp_bits}"
            + (" (and the same in the parties' topology)" if locked else "")
            if safe
            else "no format puma knows holds this model"
        )
        raise PumaError(
            f"{asked.describe()} would compute this model wrong: {chosen.findings[0].line()} "
            f"(calibrated x{MARGIN:g}; {len(chosen.findings)} site(s) in all, see puma calibrate): {fix}"
        )
    if safe is None:
        worst = plan(ranges, ops, FORMATS[-1], activation)
        raise PumaError(
            f"no format puma knows holds this model: {worst.findings[0].line()} at {FORMATS[-1].describe()}"
        )
    return safe


# -- the per-layer table --------------------------------------------------------------------


def table(ranges: Ranges, chosen: Plan) -> list[dict]:
    """One row per stage (``embed``, each block, ``head``): largest residual |h|, norm mean
    squares and shifts, largest attention score, activation input and product, and the
    findings of ``chosen`` there."""
    rows: dict[str, dict] = {}
    shifts = dict(chosen.shifts.sites)
    for site, (top, ms_min, ms_max, _) in ranges.sites.items():
        stage = site.split("/", 1)[0]
        row = rows.setdefault(
            stage,
            {
                "stage": stage,
                "residual": 0.0,
                "norms": [],
                "scores": 0.0,
                "activation": 0.0,
                "product": 0.0,
                "findings": [],
            },
        )
        owner, kind = site.rsplit("/", 1)
        if kind in NORM_INPUTS:
            row["norms"].append({"norm": owner, "ms_min": ms_min, "ms_max": ms_max, "shift": shifts.get(owner, 0)})
        elif kind == "residual":
            row["residual"] = max(row["residual"], top)
        elif kind == "scores":
            row["scores"] = max(row["scores"], top)
        elif kind == "activation_input":
            row["activation"] = max(row["activation"], top)
        else:
            row["product"] = max(row["product"], top)
    for finding in chosen.findings:
        rows[finding.site.split("/", 1)[0]]["findings"].append(finding.line())
    return list(rows.values())


def render(ranges: Ranges, chosen: Plan) -> str:
    """The per-layer table as text."""
    head = (
        f"{'stage':<12} {'max |h|':>10} {'norm mean squares (shift)':<44} {'scores':>8} {'act in':>9} "
        f"{'product':>10}  status"
    )
    lines = [f"calibrated on {ranges.inputs}; checked at {chosen.fixed.describe()} with margin x{MARGIN:g}", head]
    for row in table(ranges, chosen):
        norms = ", ".join(f"{n['ms_min']:.3g}..{n['ms_max']:.3g} ({n['shift']})" for n in row["norms"])
        status = "; ".join(row["findings"]) or "ok"
        lines.append(
            f"{row['stage']:<12} {row['residual']:>10.4g} {norms:<44} {row['scores']:>8.3g} "
            f"{row['activation']:>9.4g} {row['product']:>10.4g}  {status}"
        )
    lines.append(
        f"plan: {chosen.describe()}" + ("" if chosen.ok else f"; {len(chosen.findings)} site(s) would be wrong")
    )
    return "\n".join(lines)
