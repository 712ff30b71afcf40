"""A computing party: one SPU runtime slice that stores shares and runs compiled programs.

The same class serves every backend: a thread (``sim``), an OS process (``nodes``) or a Ray
actor (``ray``). It sees shares, public inputs and programs only (see :mod:`puma.runtime.roles`).

Per-party cost comes from SPU's own profile: with ``enable_pphlo_profile`` every
``Runtime.run`` logs a block ending in ``Link details: total send bytes ...`` to the process's
SPU log. :class:`ProcessLog` points SPU's logging at a file and hands back what each run added.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

import spu
import spu.libspu as libspu

from puma.runtime import memory, sharing
from puma.runtime.profiles import RunProfile, parse_profiles
from puma.runtime.roles import PartyShares

log = logging.getLogger(__name__)


class ProcessLog:
    """SPU's process-wide log file and a read cursor over it (one per process)."""

    _lock = threading.Lock()
    _instance: "ProcessLog | None" = None

    def __init__(self, path: str):
        self.path = path
        self._offset = 0

    @classmethod
    def get(cls, path: str | None = None) -> "ProcessLog":
        """The process's log, set up on first use (SPU allows one logging setup per process)."""
        with cls._lock:
            if cls._instance is None:
                if path is None:
                    fd, path = tempfile.mkstemp(prefix=f"puma-spu-{os.getpid()}-", suffix=".log")
                    os.close(fd)
                opts = libspu.logging.LogOptions()
                opts.system_log_path = path
                opts.enable_console_logger = False
                libspu.logging.setup_logging(opts)
                cls._instance = cls(path)
            return cls._instance

    def mark(self) -> int:
        """The current end of the log (start of what the next runs will write)."""
        return os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def read_from(self, offset: int) -> str:
        if not os.path.exists(self.path):
            return ""
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")


def link_desc(
    parties: list[tuple[str, str]], connect_s: float, recv_s: float, tls: tuple[str, str, str] | None = None
) -> libspu.link.Desc:
    """SPU's brpc link description for ``parties`` ((id, host:port) per rank): connection retries
    for ``connect_s``, receives bounded by ``recv_s``, sends to a dead peer retried for about
    ``recv_s`` (then yacl ``exit()``s the process: a party process is restarted by its
    supervisor), optional mutual TLS with this party's link certificate, key and the links CA
    (``tls``; only parties hold link certificates). Used by ``nodes`` and ``ray``."""
    desc = libspu.link.Desc()
    for party_id, address in parties:
        desc.add_party(party_id, address)
    interval_ms = 500
    desc.connect_retry_interval_ms = interval_ms
    desc.connect_retry_times = max(1, int(connect_s * 1000 / interval_ms))
    desc.recv_timeout_ms = int(recv_s * 1000)
    desc.http_timeout_ms = int(min(recv_s, 30.0) * 1000)
    desc.retry_opts.retry_interval_ms = 1000
    desc.retry_opts.retry_interval_incr_ms = 0
    desc.retry_opts.max_retry_interval_ms = 1000
    desc.retry_opts.max_retry = max(1, int(recv_s / 2))
    if tls is not None:
        cert, key, ca = tls
        desc.enable_ssl = True
        for opts in (desc.server_ssl_opts, desc.client_ssl_opts):
            opts.cert.certificate_path = cert
            opts.cert.private_key_path = key
            opts.verify.ca_file_path = ca
            opts.verify.verify_depth = 1
    return desc


def rank_of(block_name: str) -> int:
    """The rank encoded by :func:`tagged` in a profile block's name."""
    _, _, suffix = block_name.rpartition("@r")
    return int(suffix)


class ComputeParty:
    """Rank ``rank`` of the mesh: an SPU runtime over ``link`` holding named shares.

    Creating one blocks until every party has created theirs (SPU exchanges setup messages).
    Programs are installed once as code and run many times with names bound per run.
    """

    def __init__(self, rank: int, link, config: libspu.RuntimeConfig):
        self.rank = rank
        self.link = link
        self.runtime = spu.Runtime(link, config)
        self.programs: dict[str, tuple[str, bytes]] = {}
        self.pieces = sharing.Assembler()
        self._names: set[str] = set()

    def receive(self, bundle: PartyShares) -> None:
        """Store a bundle of shares (weights, inputs, state) under their names; a weight sent in
        pieces is stored when its last piece arrives."""
        if bundle.rank != self.rank:
            raise ValueError(f"party {self.rank} was handed party {bundle.rank}'s shares")
        for name, share in bundle.values.items():
            if isinstance(share, sharing.Piece):
                share = self.pieces.add(name, share)
                if share is None:
                    continue
            self.set(name, share)

    def install(self, key: str, name: str, code: bytes) -> None:
        self.programs[key] = (name, code)

    def run(self, key: str, inputs: list[str], outputs: list[str]) -> float:
        """Run installed program ``key``; its profile block is named ``<name>@r<rank>``.
        Returns this party's seconds."""
        name, code = self.programs[key]
        executable = libspu.Executable(name=f"{name}@r{self.rank}", input_names=inputs, output_names=outputs, code=code)
        start = time.perf_counter()
        self.runtime.run(executable)
        self._names.update(outputs)
        return time.perf_counter() - start

    def run_profiled(
        self, key: str, inputs: list[str], outputs: list[str], process_log: ProcessLog
    ) -> RunProfile | None:
        """Run ``key`` in a process whose SPU log belongs to this party alone; its profile block
        (link totals and per-op costs, seconds measured here)."""
        start = process_log.mark()
        seconds = self.run(key, inputs, outputs)
        blocks = parse_profiles(process_log.read_from(start))
        if not blocks:
            return None
        block = blocks[-1]
        block.link.rank = self.rank
        block.link.seconds = seconds
        block.peak_rss = memory.peak_rss()
        return block

    def send(self, names: list[str]) -> PartyShares:
        """This party's shares of ``names`` (outputs, for the client)."""
        return PartyShares(self.rank, {name: self.runtime.get_var(name) for name in names})

    def drop(self, names: list[str]) -> None:
        for name in names:
            if name in self._names:
                self.runtime.del_var(name)
                self._names.discard(name)

    def names(self) -> list[str]:
        """Names of the values this party holds."""
        return list(self._names)

    def get(self, name: str):
        return self.runtime.get_var(name)

    def set(self, name: str, share) -> None:
        self.runtime.set_var(name, share)
        self._names.add(name)

    def close(self) -> None:
        """End the session: stop the link and let the runtime (and every share it holds) go."""
        self.link.stop_link()
        self.runtime = None
