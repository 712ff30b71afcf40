"""SPU's profile log, read back: what each party's run sent, received and spent, per op.

With ``enable_pphlo_profile`` every ``Runtime.run`` logs a block: ``[Profiling] SPU execution
NAME completed ...``, section totals, one ``- op`` line per op name (by decreasing duration)
and ``Link details: ...`` with the party's link totals for the run. This module only turns
those lines into :class:`RunProfile` objects (one per party and run); how they are counted into
a result's cost, and what the totals mean, is stated once in :mod:`puma.runtime.cost`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

_HEADER = re.compile(r"\[Profiling\] SPU execution (?P<name>\S+) completed, .*execution took (?P<exec>[\d.e+-]+)s")
_OP = re.compile(
    r"- (?P<name>.+?), executed (?P<count>\d+) times, duration (?P<dur>[\d.e+-]+)s, send bytes (?P<sb>\d+) "
    r"recv bytes (?P<rb>\d+), send actions (?P<sa>\d+), recv actions (?P<ra>\d+)"
)
_LINK = re.compile(
    r"Link details: total send bytes (?P<sb>\d+), recv bytes (?P<rb>\d+), "
    r"send actions (?P<sa>\d+), recv actions (?P<ra>\d+)"
)
_TOTAL = re.compile(r"(HLO|HAL|MPC) profiling: total time")


@dataclasses.dataclass
class OpCost:
    """One pphlo op's cost, summed over the parties that are included."""

    count: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_recv: int = 0
    send_actions: int = 0
    recv_actions: int = 0

    def add(self, other: "OpCost") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclasses.dataclass
class PartyCost:
    """What one computing party spent over one or more program runs."""

    rank: int
    bytes_sent: int = 0
    bytes_recv: int = 0
    send_actions: int = 0
    recv_actions: int = 0
    seconds: float = 0.0
    runs: int = 0

    def add(self, other: "PartyCost") -> None:
        for f in dataclasses.fields(self):
            if f.name != "rank":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclasses.dataclass
class RunProfile:
    """The parsed profile of one party's run: its link totals and its per-op lines."""

    name: str
    exec_seconds: float
    link: PartyCost
    ops: dict[str, OpCost]
    peak_rss: int = 0  # the party process's peak resident bytes in this job so far (0: not measured)


def _events(text: str) -> list[tuple]:
    """The profile lines of ``text`` as ("header", RunProfile) / ("op", name, OpCost) / ("link", PartyCost)."""
    events = []
    for line in text.splitlines():
        if m := _HEADER.search(line):
            events.append(("header", RunProfile(m["name"], float(m["exec"]), PartyCost(rank=-1), {})))
        elif m := _OP.search(line):
            cost = OpCost(int(m["count"]), float(m["dur"]), int(m["sb"]), int(m["rb"]), int(m["sa"]), int(m["ra"]))
            events.append(("op", m["name"], cost))
        elif m := _LINK.search(line):
            events.append(("link", PartyCost(-1, int(m["sb"]), int(m["rb"]), int(m["sa"]), int(m["ra"]))))
        elif "printProfilingData" in line and not _TOTAL.search(line):
            raise ValueError(f"unexpected profile line: {line.strip()}")
    return events


def _totals(cost: OpCost | PartyCost) -> tuple[int, int, int, int]:
    """Bytes and actions sent and received: what a block's op lines must add up to."""
    return cost.bytes_sent, cost.bytes_recv, cost.send_actions, cost.recv_actions


def _sums(ops: dict[str, OpCost]) -> tuple[int, int, int, int]:
    total = OpCost()
    for op in ops.values():
        total.add(op)
    return _totals(total)


def parse_profiles(text: str, accept: Callable[[RunProfile], bool] | None = None) -> list[RunProfile]:
    """Parse every profile block in SPU log ``text``, in the order the blocks complete.

    Parties that share a log (the ``sim`` backend's threads) may write their blocks at the same
    moment, so lines of different blocks can interleave. Each op line is then assigned to one of
    the blocks open at that point, by search: a block lists an op once, in decreasing duration,
    and closes on a ``Link details`` line whose four totals (bytes and actions sent and received)
    its op lines must add up to exactly, and that ``accept`` (if given) approves. Exactly one
    assignment must satisfy all of that, else ``ValueError`` (two would mean the split between
    parties is a guess).
    """
    blocks: list[RunProfile] = []
    for segment in _segments(_events(text)):
        blocks += _assign(segment, accept or (lambda block: True))
    return blocks


#: Steps the search for an assignment may take before giving up on a segment.
SEARCH_BUDGET = 2_000_000


def _segments(events: list[tuple]) -> list[list[tuple]]:
    """Split at the points where every block opened so far has closed (nothing to untangle)."""
    segments, current, open_count = [], [], 0
    for event in events:
        if event[0] == "op" and open_count == 0:
            raise ValueError(f"profile line for {event[1]} outside any block")
        current.append(event)
        open_count += {"header": 1, "link": -1}.get(event[0], 0)
        if open_count < 0:
            raise ValueError("a Link details line without its block")
        if open_count == 0:
            segments.append(current)
            current = []
    return segments  # an unfinished block at the end (still being written) is left out


def _assign(events: list[tuple], accept: Callable[[RunProfile], bool]) -> list[RunProfile]:
    """The one assignment of a segment's op lines to its blocks (see :func:`parse_profiles`)."""
    solutions: dict[tuple, list[RunProfile]] = {}  # equal-valued assignments count once
    budget = [SEARCH_BUDGET]

    def search(i: int, open_blocks: list[RunProfile], done: list[RunProfile]) -> None:
        budget[0] -= 1
        if len(solutions) > 1 or budget[0] < 0:
            return
        if i == len(events):
            solution = [_copy(b) for b in done]
            solutions.setdefault(_value(solution), solution)
            return
        kind = events[i][0]
        if kind == "header":
            search(i + 1, open_blocks + [events[i][1]], done)
        elif kind == "op":
            _, name, cost = events[i]
            for block in open_blocks:
                last = min((o.seconds for o in block.ops.values()), default=float("inf"))
                if name not in block.ops and cost.seconds <= last:
                    block.ops[name] = cost
                    search(i + 1, open_blocks, done)
                    del block.ops[name]
        else:
            link = events[i][1]
            totals = _totals(link)
            for block in open_blocks:
                if _sums(block.ops) == totals and accept(block):
                    block.link = dataclasses.replace(link, seconds=block.exec_seconds, runs=1)
                    search(i + 1, [b for b in open_blocks if b is not block], done + [block])

    search(0, [], [])
    names = ", ".join(e[1].name for e in events if e[0] == "header")
    if budget[0] < 0:
        raise ValueError(f"profile blocks {names} interleave too finely to untangle")
    if not solutions:
        raise ValueError(f"profile blocks {names}: op lines do not add up to the link totals")
    if len(solutions) > 1:
        raise ValueError(f"profile blocks {names} interleave ambiguously: the split between parties is unknown")
    return next(iter(solutions.values()))


def _value(blocks: list[RunProfile]) -> tuple:
    return tuple(
        (b.name, dataclasses.astuple(b.link), tuple(sorted((k, dataclasses.astuple(v)) for k, v in b.ops.items())))
        for b in blocks
    )


def _copy(block: RunProfile) -> RunProfile:
    return RunProfile(block.name, block.exec_seconds, dataclasses.replace(block.link), dict(block.ops))
