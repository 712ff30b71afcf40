"""Declarative configuration: the MPC protocol and the party topology.

A topology file (YAML, see ``configs/3pc.yaml``) lists the computing parties with the address
of their MPC link and of their control port (where owner and clients submit work), the protocol
and its fixed-point settings, timeouts, the folder of per-role certificates (``tls``), the model
owner's and the clients' names, and where parties keep their shares (``store``). Everything is
validated on load; a mistake ends in a :class:`~puma.errors.PumaError` naming the file and the
field.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from puma.errors import PumaError

#: protocol name -> (SPU ProtocolKind name, number of computing parties)
PROTOCOLS = {"aby3": ("ABY3", 3), "semi2k": ("SEMI2K", 2), "cheetah": ("CHEETAH", 2)}
#: Protocols whose Beaver triples SPU takes from party 0: semi2k's ``RuntimeConfig.beaver_type``
#: defaults to ``TrustedFirstParty``, a dealer SPU's source calls "NOT SAFE ... SHOULD NOT BE used
#: in production": party 0 knows the masks of everything the other party opens, so it can read
#: that party's data. SPU 0.9.5's wheel has no other dealer it can run: ``TrustedThirdParty``
#: needs SPU's beaver server (a separate binary the wheel does not ship) and ``MultiParty`` is
#: not implemented for semi2k. Cheetah needs no dealer (its triples come from oblivious transfer
#: and homomorphic encryption between the two parties); ABY3 needs none either.
FIRST_PARTY_DEALER = ("semi2k",)
#: Why a topology of separate trust domains (``nodes``) refuses semi2k, and what to use instead.
DEALER_REFUSED = (
    "semi2k on nodes takes every Beaver triple from party 0 (SPU's TrustedFirstParty dealer), which lets "
    "party 0 read the other party's data: use protocol cheetah (no dealer) for two parties, or aby3 with three"
)
#: What ``sim`` and ``ray`` (one trust domain) say once when they run semi2k.
DEALER_IN_ONE_DOMAIN = (
    "semi2k takes every Beaver triple from party 0 (SPU's TrustedFirstParty dealer), so party 0 could read "
    "the other party's data: fine in one trust domain for development; across organizations use cheetah or aby3"
)
FIELDS = ("FM64", "FM128")

#: Compiler options puma turns on by default (PUMA's setting): one reciprocal per softmax row,
#: broadcast to the row, instead of one division per element. Settings are layered: these
#: defaults < the approximation set's SPU settings < explicit ones (topology file, API), so a
#: baseline set (``spu``) can turn a default off.
DEFAULT_COMPILER = (("enable_optimize_denominator_with_broadcast", True),)

#: SPU's runtime option that lets a party keep its own input as a private value; cheetah then
#: multiplies a secret by it with one homomorphic product (BumbleBee's) instead of two.
COLOCATED = "experimental_enable_colocated_optimization"


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """Which MPC protocol runs, on which ring, with how many fraction bits, and SPU options.

    ``runtime`` and ``compiler`` are extra ``spu.RuntimeConfig`` / ``spu.CompilerOptions``
    fields as (name, value) pairs; enum values are given by name (``"EXP_TAYLOR"``). They hold
    explicit settings (and, after :meth:`with_settings`, the set's); :data:`DEFAULT_COMPILER`
    lies under them.

    ``owner_private``: party 0 keeps the weights as its own private values (SPU's colocated
    optimization), as in client-server mode, where party 0 is the model owner's own. It is set
    by ``mode: client-server`` only: on any other topology party 0 is a computing party that must
    never see a weight, so ``runtime`` may not turn SPU's option on by itself.
    """

    protocol: str = "aby3"
    field: str = "FM64"
    fxp_bits: int = 18
    runtime: tuple[tuple[str, Any], ...] = ()
    compiler: tuple[tuple[str, Any], ...] = ()
    owner_private: bool = False

    def __post_init__(self):
        if COLOCATED in dict(self.runtime):
            raise PumaError(
                f"runtime option {COLOCATED} is set by mode: client-server (party 0 is then the model owner's "
                "own); remove it from the topology"
            )
        if self.owner_private and PROTOCOLS.get(self.protocol, ("", 0))[1] != 2:
            raise PumaError(f"the owner keeps its weights private only under a two-party protocol, not {self.protocol}")
        if self.protocol not in PROTOCOLS:
            raise PumaError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.field not in FIELDS:
            raise PumaError(f"unknown field {self.field!r}; choose FM64 or FM128")
        limit = 62 if self.field == "FM128" else 30
        if not 1 <= int(self.fxp_bits) <= limit:
            raise PumaError(f"fxp_bits {self.fxp_bits} is out of range for {self.field} (1..{limit})")

    @property
    def world_size(self) -> int:
        return PROTOCOLS[self.protocol][1]

    @property
    def first_party_dealer(self) -> bool:
        """Whether party 0 deals this protocol's Beaver triples (see :data:`FIRST_PARTY_DEALER`)
        and so could read what the other party opens."""
        return self.protocol in FIRST_PARTY_DEALER

    def with_settings(self, settings) -> "ProtocolConfig":
        """Add an approximation set's SPU settings (``puma.protocols.SpuSettings``) over the
        defaults; explicit fields already set here win over both."""
        runtime = dict(settings.runtime)
        runtime.update(dict(self.runtime))
        compiler = dict(settings.compiler)
        compiler.update(dict(self.compiler))
        return dataclasses.replace(
            self, runtime=tuple(sorted(runtime.items())), compiler=tuple(sorted(compiler.items()))
        )

    def runtime_config(self, profile: bool = True):
        """The ``spu.RuntimeConfig`` for this protocol (with the pphlo profile on by default)."""
        import spu.libspu as libspu

        cfg = libspu.RuntimeConfig(
            protocol=getattr(libspu.ProtocolKind, PROTOCOLS[self.protocol][0]),
            field=getattr(libspu.FieldType, self.field),
            fxp_fraction_bits=int(self.fxp_bits),
        )
        cfg.enable_pphlo_profile = profile
        setattr(cfg, COLOCATED, self.owner_private)
        for name, value in self.runtime:
            if not hasattr(cfg, name):
                raise PumaError(f"unknown SPU runtime option {name!r}")
            if isinstance(value, str):
                value = _spu_enum(libspu.RuntimeConfig, name, value)
            setattr(cfg, name, value)
        return cfg

    def compiler_options(self):
        import spu.libspu as libspu

        opts = libspu.CompilerOptions()
        for name, value in {**dict(DEFAULT_COMPILER), **dict(self.compiler)}.items():
            if not hasattr(opts, name):
                raise PumaError(f"unknown SPU compiler option {name!r}")
            setattr(opts, name, value)
        return opts

    def describe(self) -> str:
        return f"{self.protocol}/{self.field}/{self.fxp_bits}"


def _spu_enum(owner, field: str, value: str):
    """Resolve an enum value given by name, e.g. ``fxp_exp_mode="EXP_TAYLOR"``."""
    if hasattr(owner, value):
        return getattr(owner, value)
    raise PumaError(f"SPU option {field}: unknown value {value!r}")


@dataclasses.dataclass(frozen=True)
class PartySpec:
    """One computing party: its id, MPC link address and control (job) address."""

    rank: int
    id: str
    link: str
    control: str

    @property
    def control_host_port(self) -> tuple[str, int]:
        return _split_address(self.control, f"party {self.id} control")


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """The folder of per-role certificates ``puma node certs`` makes (PEM files).

    ``ca.crt`` signs every identity (parties, owner, clients) on the control connections;
    ``links-ca.crt`` signs only the parties' MPC-link certificates, so that no owner or client
    certificate can open an MPC link. The methods give the paths of each role's files.
    """

    dir: str

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _pair(self, stem: str) -> tuple[str, str]:
        return self._path(stem + ".crt"), self._path(stem + ".key")

    @property
    def ca(self) -> str:
        """The control CA's certificate (trusted for party, owner and client identities)."""
        return self._path("ca.crt")

    @property
    def links_ca(self) -> str:
        """The links CA's certificate (trusted only on the parties' MPC links)."""
        return self._path("links-ca.crt")

    def party(self, party_id: str) -> tuple[str, str]:
        """(certificate, key) of party ``party_id``'s control identity."""
        return self._pair(f"party-{party_id}")

    def party_link(self, party_id: str) -> tuple[str, str]:
        """(certificate, key) of party ``party_id``'s MPC link."""
        return self._pair(f"party-{party_id}-link")

    def owner(self, name: str) -> tuple[str, str]:
        """(certificate, key) of the model owner ``name`` (a topology has one owner: the files are
        ``owner.crt``/``owner.key``, its name is in the certificate's subject)."""
        return self._pair("owner")

    def client(self, name: str) -> tuple[str, str]:
        """(certificate, key) of client ``name``."""
        return self._pair(f"client-{name}")


#: How long parties, owner and clients retry connecting to a peer that is not up yet (seconds).
CONNECT_TIMEOUT_S = 30.0
#: How long a party waits for a peer's message before it gives up (seconds).
RECV_TIMEOUT_S = 60.0
#: How long a client may wait in the parties' queue for its turn (seconds).
QUEUE_TIMEOUT_S = 600.0
#: How long a party keeps a client's job without a command from it before it ends the job and
#: serves the next client (seconds).
JOB_IDLE_S = 300.0

#: Party ids, owner and client names: they name certificate files and subjects.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: Hosts that mean this machine.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

#: What a party waiting for its links to connect should check (they retry each failing
#: handshake for a while, so the wait ends before SPU says why).
LINKS_DID_NOT_CONNECT = (
    "the parties' links did not connect: check that each party's link address is reachable "
    "from the others and, with TLS, that their link certificates come from one run of puma node certs"
)


@dataclasses.dataclass(frozen=True)
class Topology:
    """The computing parties of one deployment, who may talk to them, and how.

    ``recv_timeout_s`` bounds how long a party waits for a peer's message before it gives up
    (a dead party is detected within it); ``connect_timeout_s`` bounds how long parties, owner
    and clients retry connecting to a peer that is not up yet; ``queue_timeout_s`` how long a
    client may wait in the parties' queue; ``job_idle_s`` how long a party keeps a client's job
    while nothing moves on its connection (no command, no bytes of one) before it ends the job,
    tells the client so and serves the next one. ``owner`` and ``clients`` are the identities (names
    in their certificates) the parties admit; each party keeps its shares under
    ``<store>/<party id>/`` (``store`` is made absolute, relative to the topology file) and
    holds a published model's shares in memory while they fit ``memory_budget`` (default 80% of
    its available memory), else reads each stage's from the store when it runs.

    ``mode: client-server`` (``client_server``): two parties and no third. Party 0 is the model
    owner's server (``puma owner serve``: its weights stay on its host), party 1 the client's own
    party, run inside the client's process for its job (it has a link address and no control
    address). See :mod:`puma.runtime.client_server`.
    """

    parties: tuple[PartySpec, ...]
    protocol: ProtocolConfig = ProtocolConfig()
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    recv_timeout_s: float = RECV_TIMEOUT_S
    queue_timeout_s: float = QUEUE_TIMEOUT_S
    job_idle_s: float = JOB_IDLE_S
    tls: TLSConfig | None = None
    owner: str = "owner"
    clients: tuple[str, ...] = ("client",)
    store: str = "store"
    memory_budget: int | None = None  # bytes of shares a party keeps resident (None: 80% of its memory)
    client_server: bool = False  # mode: client-server (see the class doc)
    source: str = "<memory>"

    def __post_init__(self):
        need = self.protocol.world_size
        if len(self.parties) != need:
            raise PumaError(
                f"{self.source}: protocol {self.protocol.protocol} needs {need} parties, the topology lists "
                f"{len(self.parties)}"
            )
        if self.client_server and need != 2:
            raise PumaError(
                f"{self.source}: mode client-server runs a two-party protocol (cheetah), not {self.protocol.protocol}"
            )
        if self.client_server != self.protocol.owner_private:
            object.__setattr__(self, "protocol", dataclasses.replace(self.protocol, owner_private=self.client_server))
        for what in ("link", "control"):
            seen = {}
            for p in self.parties:
                addr = getattr(p, what)
                if not addr and what == "control" and self.client_server and p.rank == 1:
                    continue  # the client's own party takes no connections
                _split_address(addr, f"{self.source}: party {p.id} {what}")
                if addr in seen:
                    raise PumaError(f"{self.source}: parties {seen[addr]} and {p.id} share the {what} address {addr}")
                seen[addr] = p.id
        for p in self.parties:
            check_name(p.id, f"{self.source}: party id")
        check_name(self.owner, f"{self.source}: owner")
        if not self.clients:
            raise PumaError(f"{self.source}: 'clients' is empty: list the client names the parties admit")
        for name in self.clients:
            check_name(name, f"{self.source}: client")
        if len(set(self.clients)) != len(self.clients):
            raise PumaError(f"{self.source}: 'clients' lists a name twice: {', '.join(self.clients)}")
        if not self.store:
            raise PumaError(f"{self.source}: 'store' is empty: name the folder the parties keep their shares in")
        if not os.path.isabs(self.store):
            object.__setattr__(self, "store", os.path.join(_base(self.source), os.path.expanduser(self.store)))

    @property
    def world_size(self) -> int:
        return len(self.parties)

    @property
    def loopback(self) -> bool:
        """True when every party's link and control address is on this machine."""
        return all(
            _split_address(address, "")[0].strip("[]") in LOOPBACK_HOSTS
            for p in self.parties
            for address in (p.link, p.control)
            if address
        )

    @property
    def served(self) -> tuple[PartySpec, ...]:
        """The parties that run as servers (``puma node``/``owner serve``): all of them, or in
        client-server mode the owner's party only."""
        return self.parties[:1] if self.client_server else self.parties

    def with_protocol(self, protocol: ProtocolConfig) -> "Topology":
        return dataclasses.replace(self, protocol=protocol)

    def require_separate_domains(self) -> None:
        """Refuse, in one line naming the alternatives, a protocol under which one party could
        read another's data: what ``nodes`` (each party its own trust domain) checks when a party
        starts and when an owner or client connects."""
        if self.protocol.first_party_dealer:
            raise PumaError(f"{self.source}: {DEALER_REFUSED}")

    def require_tls(self) -> TLSConfig:
        """The certificate folder, refused in one line when the topology has none or it is empty."""
        make = f"puma node certs -c {self.source}"
        if self.tls is None:
            raise PumaError(
                f"{self.source}: the nodes backend needs per-role certificates: add `tls: {{dir: certs}}` "
                f"and run {make}"
            )
        if not all(os.path.isfile(path) for path in (self.tls.ca, self.tls.links_ca)):
            raise PumaError(f"{self.source}: no certificates in {self.tls.dir}: run {make}")
        return self.tls

    @classmethod
    def from_yaml(cls, path: str) -> "Topology":
        """Read and validate a topology file."""
        import yaml

        if not os.path.exists(path):
            raise PumaError(f"topology file {path} not found")
        try:
            with open(path) as f:
                doc = yaml.safe_load(f)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise PumaError(f"{path}: not valid YAML{where}") from err
        return cls.from_dict(doc, source=path)

    @classmethod
    def from_dict(cls, doc: Any, source: str = "<dict>") -> "Topology":
        """Validate a topology given as a mapping; relative paths are relative to the folder of
        ``source`` when it is a file, else to the working directory."""
        if not isinstance(doc, dict):
            raise PumaError(f"{source}: expected a mapping with 'parties', 'protocol', ...")
        if "auth_key" in doc:
            raise PumaError(
                f"{source}: auth_key is gone: owner, clients and parties identify each other by certificate "
                f"(tls: {{dir: ...}}); make them with puma node certs -c {source}"
            )
        known = {
            "protocol",
            "field",
            "fxp_bits",
            "runtime",
            "compiler",
            "parties",
            "timeouts",
            "tls",
            "owner",
            "clients",
            "store",
            "memory_budget",
            "mode",
        }
        _check_keys(doc, known, source, "")
        mode = str(doc.get("mode", "parties"))
        if mode not in ("parties", "client-server"):
            raise PumaError(f"{source}: mode {mode!r} is not one of: parties, client-server")
        client_server = mode == "client-server"
        parties_doc = doc.get("parties")
        if not isinstance(parties_doc, list) or not parties_doc:
            raise PumaError(f"{source}: 'parties' must be a list of {{id, link, control}}")
        parties = []
        ids: dict[str, int] = {}
        for rank, p in enumerate(parties_doc):
            need = {"link"} if client_server and rank == 1 else {"link", "control"}
            if not isinstance(p, dict) or not need <= set(p):
                raise PumaError(f"{source}: party {rank} needs {' and '.join(sorted(need))} addresses (host:port)")
            _check_keys(p, {"id", "link", "control"}, source, f"parties[{rank}].")
            party_id = str(p.get("id", f"party{rank}"))
            if party_id in ids:
                raise PumaError(f"{source}: parties {ids[party_id]} and {rank} have the same id {party_id!r}")
            ids[party_id] = rank
            parties.append(PartySpec(rank, party_id, str(p["link"]), str(p.get("control", ""))))
        runtime = doc.get("runtime") or {}
        compiler = doc.get("compiler") or {}
        try:
            protocol = ProtocolConfig(
                str(doc.get("protocol", "aby3")).lower(),
                str(doc.get("field", "FM64")),
                int(doc.get("fxp_bits", 18)),
                tuple(sorted(runtime.items())),
                tuple(sorted(compiler.items())),
            )
        except (TypeError, ValueError, AttributeError) as err:
            raise PumaError(f"{source}: bad protocol settings ({err})") from err
        timeouts = doc.get("timeouts") or {}
        if not isinstance(timeouts, dict):
            raise PumaError(f"{source}: 'timeouts' must be a mapping with connect_s, recv_s, queue_s and job_idle_s")
        _check_keys(timeouts, {"connect_s", "recv_s", "queue_s", "job_idle_s"}, source, "timeouts.")
        for key, value in timeouts.items():
            try:
                ok = float(value) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise PumaError(f"{source}: timeouts.{key} must be a positive number of seconds, not {value!r}")
        clients = doc.get("clients", ["client"])
        if not isinstance(clients, list):
            raise PumaError(f"{source}: 'clients' must be a list of names, e.g. clients: [alice, bob]")
        try:
            return cls(
                tuple(parties),
                protocol,
                connect_timeout_s=float(timeouts.get("connect_s", CONNECT_TIMEOUT_S)),
                recv_timeout_s=float(timeouts.get("recv_s", RECV_TIMEOUT_S)),
                queue_timeout_s=float(timeouts.get("queue_s", QUEUE_TIMEOUT_S)),
                job_idle_s=float(timeouts.get("job_idle_s", JOB_IDLE_S)),
                tls=_tls(doc.get("tls"), source),
                owner=str(doc.get("owner", "owner") or ""),
                clients=tuple(str(name) for name in clients),
                store=str(doc.get("store", "store") or ""),
                memory_budget=_budget(doc.get("memory_budget"), source),
                client_server=client_server,
                source=source,
            )
        except (TypeError, ValueError) as err:
            raise PumaError(f"{source}: bad timeouts ({err})") from err


def check_name(name: str, what: str) -> str:
    """``name`` if it can name a certificate file and subject, else a one-line refusal."""
    if not NAME.fullmatch(name):
        raise PumaError(f"{what} {name!r} must be letters, digits, '.', '_' or '-' (starting with a letter or digit)")
    return name


def _base(source: str) -> str:
    """The folder relative paths in the topology ``source`` are relative to."""
    return os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else os.getcwd()


def _tls(t: Any, source: str) -> TLSConfig | None:
    """The ``tls`` section: ``{dir: FOLDER}`` or just ``FOLDER`` (relative to the topology file)."""
    if t is None:
        return None
    if isinstance(t, dict):
        if {"cert", "key", "ca"} & set(t):
            raise PumaError(
                f"{source}: tls now names a folder of per-role certificates: tls: {{dir: certs}}; "
                f"make them with puma node certs -c {source}"
            )
        _check_keys(t, {"dir"}, source, "tls.")
        t = t.get("dir")
    if not isinstance(t, str) or not t.strip():
        raise PumaError(f"{source}: 'tls' must name the certificate folder: tls: {{dir: certs}}")
    return TLSConfig(os.path.join(_base(source), os.path.expanduser(t)))


def _budget(value, source: str) -> int | None:
    """``memory_budget`` (``16G``, ``512M`` or bytes): the shares a party keeps resident."""
    if value is None:
        return None
    from puma.runtime.memory import parse_size

    try:
        return parse_size(str(value))
    except ValueError as err:
        raise PumaError(f"{source}: memory_budget: {err}") from None


def _check_keys(doc: dict, known: set[str], source: str, where: str) -> None:
    """Refuse a key the topology format does not have, with the closest known one."""
    import difflib

    for key in doc:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6) or difflib.get_close_matches(
                str(key).lower(), sorted(known), n=1, cutoff=0.6
            )
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(known))})"
            raise PumaError(f"{source}: unknown key '{where}{key}'{hint}")


def _split_address(address: str, what: str) -> tuple[str, int]:
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PumaError(f"{what}: {address!r} is not host:port")
    return host, int(port)
