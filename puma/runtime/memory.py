"""Process memory: peak resident set size (Linux ``VmHWM``), resetting it, and what is free.

Peak RSS is what the kernel recorded as the most physical memory the process held. A party
process resets it when a job opens (writing ``5`` to ``/proc/self/clear_refs``), so each job's
report carries that job's peak; benchmarks reset it per cell. Where ``/proc`` is not there (or
not writable) the functions return 0 / do nothing, and reports say 0.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)


def _status_kb(field: str, path: str = "/proc/self/status") -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def peak_rss() -> int:
    """Bytes: the most resident memory this process held since it started or since :func:`reset_peak`."""
    return _status_kb("VmHWM") * 1024


def reset_peak() -> None:
    """Start a new peak from the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        log.debug("cannot reset the peak RSS: %s", err)


def available() -> int:
    """Bytes of memory available for new allocations on this host (``MemAvailable``)."""
    return _status_kb("MemAvailable", "/proc/meminfo") * 1024


def host() -> tuple[str, int]:
    """(host name, available bytes): what a party tells the driver about its machine."""
    return socket.gethostname(), available()


def parse_size(text: str) -> int:
    """'16G', '512M', '2.5GiB', '1000000' -> bytes (powers of 1024 for K/M/G/T)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    number, unit = value, ""
    if value and value[-1] in units:
        number, unit = value[:-1], value[-1]
    try:
        size = float(number) * units[unit]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{text!r} is not a size (use e.g. 16G, 512M)") from err
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return int(size)


def fmt(n: int) -> str:
    """Bytes in binary units, for messages."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
