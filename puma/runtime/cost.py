"""Cost reports: what each computing party sent, received and spent, per run and per op.

Counting rule (as CrypTen's communication stats): every party counts the bytes and messages it
sends and receives over its links during program execution (SPU's link statistics around
``Runtime.run``). ``total_bytes_sent`` is the sum of the bytes *sent* by all parties, which
equals the total traffic on the wire (each byte is sent once and received once, so adding the
received bytes would count it twice). ``total_send_actions`` sums the parties' send calls.
Sharing weights and inputs and reconstructing outputs happen outside program execution and are
reported separately as ``io_bytes`` (the size of the shares moved between roles).

Per-op figures come from SPU's pphlo profile (``enable_pphlo_profile``): for each op name,
bytes and actions summed over the parties, and seconds summed over the parties.
"""

from __future__ import annotations

import dataclasses
import re

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


def parse_profiles(text: str) -> list[RunProfile]:
    """Parse every complete profile block in SPU log ``text``, in order.

    A block is ``[Profiling] SPU execution NAME completed ...``, section totals, ``- op`` lines
    and ``Link details: ...``. The blocks must not interleave (one party per log, or staggered
    parties, see :mod:`puma.runtime.sim`); each block is checked: its op lines must add up to its
    link totals, else ``ValueError``.
    """
    profiles = []
    current = None
    for line in text.splitlines():
        if m := _HEADER.search(line):
            if current is not None:
                raise ValueError(f"profile block {current.name} interrupted by {m['name']}")
            current = RunProfile(m["name"], float(m["exec"]), PartyCost(rank=-1), {})
        elif current is None:
            continue
        elif m := _OP.search(line):
            if m["name"] in current.ops:
                raise ValueError(f"profile block {current.name} lists {m['name']} twice")
            current.ops[m["name"]] = OpCost(
                int(m["count"]), float(m["dur"]), int(m["sb"]), int(m["rb"]), int(m["sa"]), int(m["ra"])
            )
        elif m := _LINK.search(line):
            current.link = PartyCost(
                -1, int(m["sb"]), int(m["rb"]), int(m["sa"]), int(m["ra"]), current.exec_seconds, 1
            )
            _check_block(current)
            profiles.append(current)
            current = None
        elif not _TOTAL.search(line) and "printProfilingData" in line:
            raise ValueError(f"unexpected profile line in block {current.name}: {line.strip()}")
    return profiles


def _check_block(profile: RunProfile) -> None:
    sums = OpCost()
    for op in profile.ops.values():
        sums.add(op)
    link = profile.link
    if (sums.bytes_sent, sums.bytes_recv, sums.send_actions, sums.recv_actions) != (
        link.bytes_sent,
        link.bytes_recv,
        link.send_actions,
        link.recv_actions,
    ):
        raise ValueError(f"profile block {profile.name}: op lines do not add up to the link totals")


@dataclasses.dataclass
class CostReport:
    """Cost of the program runs behind one result, per party and per op.

    ``wall_s`` is the driver's wall-clock time for those runs, sharing and reconstruction
    included, compilation excluded (``compile_s``: programs compile once per shape and are
    reused); ``per_party[r].seconds`` is party r's own execution time.
    """

    backend: str
    protocol: str
    per_party: list[PartyCost]
    per_op: dict[str, OpCost] = dataclasses.field(default_factory=dict)
    wall_s: float = 0.0
    runs: int = 0
    io_bytes: int = 0
    runs_by_program: dict[str, int] = dataclasses.field(default_factory=dict)
    compile_s: float = 0.0

    @classmethod
    def empty(cls, backend: str, protocol: str, world_size: int) -> "CostReport":
        return cls(backend, protocol, [PartyCost(rank=r) for r in range(world_size)])

    @property
    def total_bytes_sent(self) -> int:
        return sum(p.bytes_sent for p in self.per_party)

    @property
    def total_send_actions(self) -> int:
        return sum(p.send_actions for p in self.per_party)

    def add_run(
        self, program: str, parties: list[RunProfile | None], wall_s: float, io_bytes: int = 0, compile_s: float = 0.0
    ) -> None:
        """Fold one run (one profile per party, ``None`` where a party was not profiled) in."""
        self.runs += 1
        self.wall_s += wall_s
        self.compile_s += compile_s
        self.io_bytes += io_bytes
        self.runs_by_program[program] = self.runs_by_program.get(program, 0) + 1
        for rank, profile in enumerate(parties):
            if profile is None:
                continue
            self.per_party[rank].add(profile.link)
            for name, op in profile.ops.items():
                self.per_op.setdefault(name, OpCost()).add(op)

    def to_dict(self) -> dict:
        """JSON-ready form: ``per_party``, ``total_bytes_sent``, ``total_send_actions``, ``wall_s``, ..."""
        return {
            "backend": self.backend,
            "protocol": self.protocol,
            "per_party": [dataclasses.asdict(p) for p in self.per_party],
            "total_bytes_sent": self.total_bytes_sent,
            "total_send_actions": self.total_send_actions,
            "wall_s": round(self.wall_s, 6),
            "compile_s": round(self.compile_s, 3),
            "runs": self.runs,
            "runs_by_program": dict(self.runs_by_program),
            "io_bytes": self.io_bytes,
            "per_op": {
                name: dataclasses.asdict(op)
                for name, op in sorted(self.per_op.items(), key=lambda kv: (-kv[1].bytes_sent, kv[0]))
            },
            "counting": "total_bytes_sent = sum over parties of bytes each sent during program execution",
        }

    def summary(self) -> str:
        """A few human-readable lines: per party and totals."""
        lines = [f"cost ({self.backend}, {self.protocol}, {self.runs} run(s), {self.wall_s:.2f} s wall):"]
        for p in self.per_party:
            lines.append(
                f"  party {p.rank}: sent {_fmt_bytes(p.bytes_sent)} in {p.send_actions} sends, "
                f"received {_fmt_bytes(p.bytes_recv)}, {p.seconds:.2f} s"
            )
        lines.append(f"  total sent: {_fmt_bytes(self.total_bytes_sent)} in {self.total_send_actions} sends")
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
