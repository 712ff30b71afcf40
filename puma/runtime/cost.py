"""Cost reports: what each computing party sent, received and spent, per run and per op.

Counting rule (as CrypTen's communication stats): every party counts the bytes and messages it
sends and receives over its links during program execution (SPU's link statistics around
``Runtime.run``). ``total_bytes_sent`` is the sum of the bytes *sent* by all parties, which
equals the total traffic on the wire (each byte is sent once and received once, so adding the
received bytes would count it twice). ``total_send_actions`` sums the parties' send calls.
Sharing weights and inputs and reconstructing outputs happen outside program execution and are
reported separately: ``client_upload_bytes`` (the client's input shares, sent to the parties),
``client_download_bytes`` (the output shares the parties send the client) and their sum
``io_bytes``.

Streamed weights (shared stage by stage, see :mod:`puma.staged`) are reported apart as
``weight_bytes`` (what the owner sent the parties, in the compact form of
:mod:`puma.runtime.sharing`: a third of the shares the parties then hold) and ``weight_s`` (the
time to share and store them, also part of ``wall_s``). Memory:
``party_peak_rss`` per party process (nodes, ray; reset when a job opens), ``process_peak_rss``
of the driver's process (in ``sim`` it holds all parties and the owner) and ``owner_peak_rss``
when the owner runs in a process of its own (ray).

Per-op figures come from SPU's pphlo profile (``enable_pphlo_profile``): for each op name,
bytes and actions summed over the parties, and seconds summed over the parties.

Attribution (the one rule every backend follows): a run's cost is what each party's own profile
block of that run says (:mod:`puma.runtime.profiles` reads the blocks; the backend hands
:meth:`CostReport.add_run` one per party). ``per_party[r].seconds`` is party r's execution time
as it measured it, minus anything the backend added to tell parties apart (sim's markers). A
party whose block of a run is missing adds nothing for that run (never a guess); the run still
counts in ``runs`` and ``wall_s`` and is listed in ``unprofiled_runs``.
"""

from __future__ import annotations

import dataclasses

from puma.runtime.profiles import OpCost, PartyCost, RunProfile


@dataclasses.dataclass
class CostReport:
    """Cost of the program runs behind one result, per party and per op.

    ``wall_s`` is the driver's wall-clock time for those runs, sharing and reconstruction
    included, compilation excluded (``compile_s``: programs compile once per shape and are
    reused, and a program an earlier process compiled costs only its lookup in the compile
    cache); ``per_party[r].seconds`` is party r's own execution time.
    """

    backend: str
    protocol: str
    per_party: list[PartyCost]
    per_op: dict[str, OpCost] = dataclasses.field(default_factory=dict)
    wall_s: float = 0.0
    runs: int = 0
    client_upload_bytes: int = 0
    client_download_bytes: int = 0
    runs_by_program: dict[str, int] = dataclasses.field(default_factory=dict)
    compile_s: float = 0.0
    unprofiled_runs: int = 0  # runs whose costs could not be attributed per party (left out above)
    weights_mode: str = "resident"
    weight_bytes: int = 0  # bytes the owner sent the parties for weights during these runs (streamed mode)
    weight_s: float = 0.0  # seconds the model owner spent sharing and delivering them
    store_bytes: int = 0  # weight shares the parties read back from their share stores instead
    store_s: float = 0.0
    party_peak_rss: list[int] = dataclasses.field(default_factory=list)  # per party process (nodes, ray)
    process_peak_rss: int = 0  # this (driver) process: in sim it holds every party and the owner
    owner_peak_rss: int = 0  # the model owner's process when it is not this one (ray)

    @classmethod
    def empty(cls, backend: str, protocol: str, world_size: int) -> "CostReport":
        return cls(backend, protocol, [PartyCost(rank=r) for r in range(world_size)], party_peak_rss=[0] * world_size)

    def add_weights(self, nbytes: int, seconds: float) -> None:
        """Weight shares streamed to the parties for these runs (their time counts in ``wall_s``)."""
        self.weight_bytes += nbytes
        self.weight_s += seconds
        self.wall_s += seconds

    def add_store(self, nbytes: int, seconds: float) -> None:
        """Weight shares read back from the parties' share stores (no owner involved)."""
        self.store_bytes += nbytes
        self.store_s += seconds
        self.wall_s += seconds

    @property
    def total_bytes_sent(self) -> int:
        return sum(p.bytes_sent for p in self.per_party)

    @property
    def io_bytes(self) -> int:
        return self.client_upload_bytes + self.client_download_bytes

    @property
    def total_send_actions(self) -> int:
        return sum(p.send_actions for p in self.per_party)

    def add_run(
        self,
        program: str,
        parties: list[RunProfile | None],
        wall_s: float,
        client_io: tuple[int, int] = (0, 0),
        compile_s: float = 0.0,
    ) -> None:
        """Fold one run (one profile per party, ``None`` where a party was not profiled) in."""
        self.runs += 1
        self.wall_s += wall_s
        self.compile_s += compile_s
        self.client_upload_bytes += client_io[0]
        self.client_download_bytes += client_io[1]
        self.runs_by_program[program] = self.runs_by_program.get(program, 0) + 1
        if any(profile is None for profile in parties):
            self.unprofiled_runs += 1
        for rank, profile in enumerate(parties):
            if profile is None:
                continue
            self.party_peak_rss[rank] = max(self.party_peak_rss[rank], profile.peak_rss)
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
            "client_upload_bytes": self.client_upload_bytes,
            "client_download_bytes": self.client_download_bytes,
            "unprofiled_runs": self.unprofiled_runs,
            "weights": self.weights_mode,
            "weight_bytes": self.weight_bytes,
            "weight_s": round(self.weight_s, 3),
            "store_bytes": self.store_bytes,
            "store_s": round(self.store_s, 3),
            "peak_rss": {
                "parties": list(self.party_peak_rss),
                "process": self.process_peak_rss,
                "owner": self.owner_peak_rss,
            },
            "per_op": {
                name: dataclasses.asdict(op)
                for name, op in sorted(self.per_op.items(), key=lambda kv: (-kv[1].bytes_sent, kv[0]))
            },
            "counting": "total_bytes_sent = sum over parties of bytes each sent during program execution "
            "(puma.runtime.cost)",
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
        peaks = ", ".join(f"party {r} {p / 2**30:.2f}" for r, p in enumerate(self.party_peak_rss) if p)
        lines.append(
            f"  weights {self.weights_mode}"
            + (
                f" ({_fmt_bytes(self.weight_bytes)} sent by the owner in {self.weight_s:.1f} s)"
                if self.weight_bytes
                else ""
            )
            + (
                f" ({_fmt_bytes(self.store_bytes)} read from share stores in {self.store_s:.1f} s)"
                if self.store_bytes
                else ""
            )
            + f"; peak RSS GiB: this process {self.process_peak_rss / 2**30:.2f}"
            + (f", {peaks}" if peaks else "")
            + (f", owner {self.owner_peak_rss / 2**30:.2f}" if self.owner_peak_rss else "")
        )
        if self.unprofiled_runs:
            lines.append(f"  ({self.unprofiled_runs} run(s) could not be profiled per party and are not counted)")
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
