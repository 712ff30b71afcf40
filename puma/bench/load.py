"""Was a timed cell alone on the machine? Load recorded per cell, and a wait for quiet.

:class:`LoadMonitor` measures, over a timed block, the CPU time the whole machine spent busy
(``/proc/stat``: user, nice, system, irq, softirq, steal) and the CPU time of the benchmark's own
processes (this process, its children, and any other pids it names, such as ``nodes`` party
processes); the difference is what other processes took. A cell is **contended** when others
took more than :data:`CONTENDED_FRACTION` of one CPU over the block (and at least
:data:`CONTENDED_MIN_S` seconds). The 1-minute load average at the end is kept as well.
"""

from __future__ import annotations

import os
import time

from puma.runtime.local import descendants

#: Others' CPU time, as a fraction of the block's wall time, above which a cell is contended.
CONTENDED_FRACTION = 0.05
#: ... and at least this many CPU seconds (short blocks are not flagged for a stray process).
CONTENDED_MIN_S = 2.0

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_s() -> float:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _HZ


def _cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` and of its waited-for children (``/proc/<pid>/stat``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / _HZ  # utime, stime, cutime, cstime
    except (OSError, ValueError, IndexError):
        return 0.0


def _tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def load_average() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError):
        return 0.0


class LoadMonitor:
    """``with LoadMonitor() as load: ...`` then ``load.report()``; ``pids`` adds processes (or a
    callable returning them, read at the end) whose CPU time counts as the benchmark's own."""

    def __init__(self, pids=()):
        self._pids = pids

    def _ours(self, extra: list[int]) -> dict[int, float]:
        pids = set(_tree(os.getpid()))
        for pid in extra:
            pids.update(_tree(pid))
        return {pid: _cpu_s(pid) for pid in pids}

    def __enter__(self) -> "LoadMonitor":
        self._extra = list(self._pids() if callable(self._pids) else self._pids)
        self._start = time.monotonic()
        self._busy0 = _busy_s()
        self._ours0 = self._ours(self._extra)
        return self

    def __exit__(self, *exc) -> None:
        extra = list(self._pids() if callable(self._pids) else self._pids)
        ours1 = self._ours(extra)
        self.wall_s = time.monotonic() - self._start
        busy = _busy_s() - self._busy0
        ours = sum(ours1[p] - self._ours0.get(p, 0.0) for p in ours1)
        self.others_cpu_s = max(0.0, busy - ours)
        self.load_1m = load_average()

    def report(self) -> dict:
        contended = self.others_cpu_s > max(CONTENDED_MIN_S, CONTENDED_FRACTION * self.wall_s)
        return {
            "others_cpu_s": round(self.others_cpu_s, 2),
            "load_1m": self.load_1m,
            "wall_s": round(self.wall_s, 2),
            "contended": contended,
        }


def wait_quiet(timeout_s: float, sample_s: float = 5.0) -> bool:
    """Wait until other processes take under :data:`CONTENDED_FRACTION` of a CPU over a
    ``sample_s`` window; False if the machine was never quiet within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        with LoadMonitor() as probe:
            time.sleep(sample_s)
        if probe.others_cpu_s <= CONTENDED_FRACTION * probe.wall_s:
            return True
        if time.monotonic() >= deadline:
            return False
