"""Process memory: peak resident set size (Linux ``VmHWM``), resetting it, and what is free.

Peak RSS is what the kernel recorded as the most physical memory the process held. A party
process resets it when a job opens (writing ``5`` to ``/proc/self/clear_refs``), so each job's
report carries that job's peak; benchmarks reset it per cell. Where ``/proc`` is not there (or
not writable) the functions return 0 / do nothing, and reports say 0.

**Keeping freed memory.** A streamed run frees and reallocates gigabytes per layer. glibc
hands every allocation above 32 MiB its own ``mmap`` and unmaps it when freed, and trims the
heap's top: the pages go back to the kernel. On virtual machines that report free pages to the
host (virtio-balloon free page reporting, as on the Firecracker VM these numbers come from) a
page given back costs a host fault when touched again: measured here, 4 GiB touched again 5 s
after being freed took 6.7 s (0.15 s while still mapped), and streaming one LLaMA-7B layer's
shares took 45 s, of which 24 s were SPU's ``set_var`` touching fresh pages.
:data:`HEAP_TUNABLES` keeps freed memory in the process (no per-allocation ``mmap``, no
trimming): the same layer then streams in 11 s. Peak RSS is still what the run needs at once;
what changes is that a process does not return memory to the system until it exits. glibc
reads the tunables when a process starts, so the ``puma`` command, ``nodes`` party processes
and Ray party/owner actors are started with them (:func:`heap_env`); set ``PUMA_KEEP_HEAP=0``
to leave glibc's defaults.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

log = logging.getLogger(__name__)


#: glibc malloc tunables that keep freed memory mapped in the process (see the module doc).
HEAP_TUNABLES = ("glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={1 << 46}")


def _keep_heap(env) -> bool:
    return env.get("PUMA_KEEP_HEAP", "1") != "0"


def heap_env(env=None) -> dict[str, str]:
    """The environment variables a process should start with to keep freed memory: ``GLIBC_TUNABLES``
    with :data:`HEAP_TUNABLES` added to what ``env`` (default ``os.environ``) already sets; empty
    when ``PUMA_KEEP_HEAP=0``."""
    env = os.environ if env is None else env
    if not _keep_heap(env):
        return {}
    present = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=", 1)[0] for t in HEAP_TUNABLES}
    kept = [t for t in present if t.split("=", 1)[0] not in names]
    return {"GLIBC_TUNABLES": ":".join(kept + list(HEAP_TUNABLES))}


def heap_kept(env=None) -> bool:
    """Whether a process started with ``env`` (default: this one's) keeps freed memory."""
    env = os.environ if env is None else env
    present = set(env.get("GLIBC_TUNABLES", "").split(":"))
    return all(t in present for t in HEAP_TUNABLES)


def needs_heap_restart(env=None) -> bool:
    """Whether a process with ``env`` should restart itself with :func:`heap_env` (it does not keep
    freed memory and the user has not opted out)."""
    env = os.environ if env is None else env
    return _keep_heap(env) and not heap_kept(env)


@contextlib.contextmanager
def heap_environ():
    """Within this block, processes started from here (``multiprocessing`` spawn inherits
    ``os.environ``) keep freed memory; this process's environment is restored after."""
    extra = heap_env()
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


def free_heap() -> int:
    """Bytes this process has freed but keeps in its malloc heap (glibc ``mallinfo2().fordblks``):
    memory it can reuse without asking the system, large when it keeps freed memory."""
    import ctypes

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        ] + [("keepcost", ctypes.c_size_t)]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        return int(libc.mallinfo2().fordblks)
    except (OSError, AttributeError):
        return 0


def available() -> int:
    """Bytes this process can allocate on this host: the system's ``MemAvailable`` plus what
    the process holds freed in its own heap (after a big run that keeps freed memory, most of
    its RSS is reusable: counting only ``MemAvailable`` would see it as taken)."""
    return _status_kb("MemAvailable", "/proc/meminfo") * 1024 + free_heap()


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
