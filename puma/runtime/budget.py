"""Resident or streamed weights: what the weight shares cost in memory and which mode fits.

A weight costs, in each party process, ``shares_per_party x ring bytes``: ABY3 keeps two ring
elements per party (16 bytes on FM64, 32 on FM128), 2-party protocols one. In ``sim`` the three
parties share one process, so that process holds three times as much; in plaintext a weight is
its 4 float32 bytes. The *memory budget* is the memory the weights may take in one process (a
party process on ``nodes``/``ray``, the whole process on ``sim``/plaintext). Its default is 80%
of the memory available on the host, split between the parties that share it.

- ``resident``: every weight is shared once and kept for the session (serve many queries);
- ``streamed``: each stage's weights are shared just before the stage and dropped after it,
  so the parties hold one stage at a time (:mod:`puma.staged`);
- ``auto`` picks resident when every weight fits the budget, else streamed.

A budget that cannot hold one tensor's shares, or one stage's, is refused with the tensor or
stage named and the memory it needs.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from puma.errors import PumaError
from puma.runtime import memory

log = logging.getLogger(__name__)

MODES = ("auto", "resident", "streamed")
#: Share of the available memory the default budget allows the weights.
DEFAULT_FRACTION = 0.8
_RING_BYTES = {"FM64": 8, "FM128": 16}
_SHARES_PER_PARTY = {"aby3": 2, "semi2k": 1, "cheetah": 1}


@dataclasses.dataclass(frozen=True)
class WeightPlan:
    """The mode chosen and why, with the numbers behind it (bytes in one process)."""

    mode: str
    budget: int
    resident_bytes: int
    largest_stage: tuple[str, int]
    reason: str

    def describe(self) -> str:
        return f"weights {self.mode}: {self.reason}"


def bytes_per_weight(protocol: str, field: str, parties_per_process: int) -> int:
    """Memory one secret-shared weight costs in one process holding ``parties_per_process``
    parties' shares (all of them where a backend keeps its parties in one process)."""
    return _SHARES_PER_PARTY[protocol] * _RING_BYTES[field] * parties_per_process


def default_budget(hosts: list[tuple[str, int]]) -> int:
    """80% of the smallest per-party share of available memory over the parties' hosts."""
    count: dict[str, int] = {}
    for name, _ in hosts:
        count[name] = count.get(name, 0) + 1
    return int(DEFAULT_FRACTION * min(free // count[name] for name, free in hosts))


def plan(
    shapes: dict[str, tuple[int, ...]],
    stages,
    per_weight: int,
    budget: int,
    mode: str = "auto",
    table_rows: list[tuple[int, int]] = (),
) -> WeightPlan:
    """Choose resident or streamed weights for a model of ``shapes`` (flat Flax paths) run in
    ``stages`` (:class:`puma.models.layers.Stages`) when a weight costs ``per_weight`` bytes.
    ``table_rows``: the row blocks a streamed token table is read in (``stages.table``), so a
    streamed stage holds its largest block rather than the whole table."""
    if mode not in MODES:
        raise PumaError(f"weights mode must be one of {', '.join(MODES)}, not {mode!r}")
    size = {name: int(np.prod(shape, dtype=np.int64)) * per_weight for name, shape in shapes.items()}
    resident = sum(size.values())
    if table_rows:  # streamed, the table is held one row block at a time
        shape = shapes[stages.table]
        rows = max(stop - start for start, stop in table_rows)
        size[stages.table] = rows * int(np.prod(shape[1:], dtype=np.int64)) * per_weight
    by_stage: dict[str, int] = {}
    for name, nbytes in size.items():
        top = name.split("/", 1)[0]
        by_stage[top] = by_stage.get(top, 0) + nbytes
    groups = [("embedding", stages.embed), ("head", stages.head)] + [
        (stages.layer_key(i), (stages.layer_key(i),)) for i in range(stages.layers)
    ]
    stage_bytes = [(name, sum(by_stage.get(k, 0) for k in keys)) for name, keys in groups]
    largest = max(stage_bytes, key=lambda item: item[1])
    budget_text = memory.fmt(budget)
    if mode == "resident" or (mode == "auto" and resident <= budget):
        if resident > budget:
            raise PumaError(
                f"resident weights need {memory.fmt(resident)} in each process, more than the memory budget "
                f"{budget_text}: use --weights streamed (or auto), or raise --memory-budget"
            )
        return WeightPlan("resident", budget, resident, largest, f"{memory.fmt(resident)} of shares fit {budget_text}")
    tensor, tensor_bytes = max(size.items(), key=lambda item: item[1])
    if tensor_bytes > budget:
        raise PumaError(
            f"memory budget {budget_text} cannot hold even tensor {tensor} ({memory.fmt(tensor_bytes)} of shares "
            f"in one process): raise --memory-budget to at least that"
        )
    if largest[1] > budget:
        raise PumaError(
            f"memory budget {budget_text} cannot hold stage {largest[0]} ({memory.fmt(largest[1])} of shares in one "
            f"process): raise --memory-budget to at least that"
        )
    why = "requested" if mode == "streamed" else f"resident shares {memory.fmt(resident)} exceed {budget_text}"
    return WeightPlan(
        "streamed",
        budget,
        resident,
        largest,
        f"{why}; largest stage {largest[0]} holds {memory.fmt(largest[1])}",
    )
