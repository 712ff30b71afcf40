"""``puma owner publish|unpublish|serve`` (the model owner; ``serve``: client-server mode) and
``puma node up|start|certs`` (the computing parties of the ``nodes`` backend, and their
certificates)."""

from __future__ import annotations

import json
import os
import sys

from puma import options, protocols
from puma.errors import PumaError


def add_parsers(sub, common) -> None:
    owner = sub.add_parser(
        "owner",
        help="the model owner: publish a model to the parties' own stores, or remove it",
    )
    owner_sub = owner.add_subparsers(dest="owner_command", required=True)
    pub = owner_sub.add_parser(
        "publish",
        parents=[common],
        help="calibrate, sign the manifest, share the weights into every party's store, write the manifest",
    )
    pub.add_argument("--model", "-m", required=True, help=options.MODEL_HELP)
    pub.add_argument(
        "--config",
        "-c",
        required=True,
        help="required: the parties' topology (with tls: {dir: ...})",
    )
    pub.add_argument(
        "--out",
        "-o",
        required=True,
        help="required: where to write the manifest (public: give it to clients)",
    )
    pub.add_argument(
        "--approx",
        nargs="+",
        default=list(protocols.PUBLISHED),
        help="approximation sets clients may use (default: %(default)s)",
    )
    pub.add_argument(
        "--allow-logits",
        action="store_true",
        help="let clients receive logits (default: tokens only)",
    )
    pub.set_defaults(func=cmd_owner_publish)
    serve = owner_sub.add_parser(
        "serve",
        parents=[common],
        help="client-server mode: run the owner's own party with the weights on this host and serve clients",
    )
    serve.add_argument("--model", "-m", required=True, help=options.MODEL_HELP)
    serve.add_argument("--config", "-c", required=True, help="required: a client-server topology (mode: client-server)")
    serve.add_argument(
        "--out", "-o", required=True, help="required: where to write the manifest (public: give it to clients)"
    )
    serve.add_argument(
        "--approx",
        nargs="+",
        default=list(protocols.PUBLISHED),
        help="approximation sets clients may use (default: %(default)s)",
    )
    serve.add_argument("--allow-logits", action="store_true", help="let clients receive logits (default: tokens only)")
    serve.add_argument("--log-dir", default="runs/parties", help="where the party's log goes (default: %(default)s)")
    serve.set_defaults(func=cmd_owner_serve)
    unpub = owner_sub.add_parser("unpublish", parents=[common], help="remove a published model from every party")
    unpub.add_argument("--model", "-m", required=True, help="required: the model's manifest")
    unpub.add_argument("--config", "-c", required=True, help="required: the parties' topology")
    unpub.set_defaults(func=cmd_owner_unpublish)

    node = sub.add_parser("node", help="run computing parties for the nodes backend")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    up = node_sub.add_parser(
        "up",
        parents=[common],
        help="start every party of the topology on this machine and supervise them",
    )
    up.add_argument("--config", "-c", required=True, help="required: topology file")
    up.add_argument(
        "--log-dir",
        default="runs/parties",
        help="where party logs go (default: %(default)s)",
    )
    up.set_defaults(func=cmd_node_up)
    start = node_sub.add_parser("start", parents=[common], help="start one party (on its own host)")
    start.add_argument("--config", "-c", required=True, help="required: topology file")
    start.add_argument("--rank", type=int, required=True, help="required: which party of the topology this is")
    start.add_argument(
        "--log-dir",
        default="runs/parties",
        help="where the party's log goes (default: %(default)s)",
    )
    start.set_defaults(func=cmd_node_start)
    certs = node_sub.add_parser(
        "certs",
        parents=[common],
        help="make the per-role certificates (parties, owner, clients) in the topology's tls folder",
    )
    certs.add_argument(
        "--config",
        "-c",
        required=True,
        help="required: topology file with a tls: {dir: FOLDER} section",
    )
    certs.add_argument("--days", type=int, default=365, help="validity in days (default: %(default)s)")
    certs.add_argument(
        "--force", action="store_true", help="replace the existing certificate files (default: refuse to)"
    )
    certs.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="also make a certificate for client NAME (repeatable; the topology's clients get one anyway; "
        "default: none)",
    )
    certs.set_defaults(func=cmd_node_certs)


def cmd_owner_publish(args) -> int:
    from puma import deploy

    done = deploy.publish_to(args.config, args.model, args.out, args.approx, _policy(args))
    print(json.dumps({k: v for k, v in done.items() if k != "parties"}))
    print(
        f"puma: published {done['model_id']} to {len(done['parties'])} parties in {done['seconds']:.0f} s; "
        f"manifest {args.out} (give it to clients; the weights file is no longer needed by anyone)",
        file=sys.stderr,
    )
    return 0


def _policy(args) -> dict:
    from puma import deploy
    from puma.models import load

    unknown = [a for a in args.approx if a not in protocols.names()]
    if unknown:
        raise PumaError(f"unknown approximation set {unknown[0]!r}; choose from {', '.join(protocols.names())}")
    policy = deploy.default_policy(load(args.model, weights=False), args.approx)
    if args.allow_logits:
        policy["reveal"].append("logits")
        if "generate" in policy["tasks"]:
            policy["tasks"].append("logits")
    return policy


def cmd_owner_serve(args) -> int:
    """Start the owner's party (supervised), publish the model into its store once it is up,
    write the manifest, and serve clients until stopped."""
    import signal
    import threading

    from puma import deploy
    from puma.runtime.config import Topology
    from puma.runtime.nodes import supervise

    topology = Topology.from_yaml(args.config)
    if not topology.client_server:
        raise PumaError(
            f"{args.config} is not a client-server topology (mode: client-server): for computing parties "
            "use puma node up and puma owner publish"
        )
    topology.require_tls()
    policy = _policy(args)
    failed: list[str] = []

    def publish() -> None:
        try:
            done = deploy.publish_to(args.config, args.model, args.out, args.approx, policy)
        except Exception as err:  # one line, then stop serving
            failed.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        print(
            f"puma: serving {done['model_id']} in {done['seconds']:.0f} s; manifest {args.out} (give it to "
            f"clients with their certificates); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )

    def ready() -> None:
        _ready_line(topology, [0])()
        threading.Thread(target=publish, daemon=True).start()

    print(
        f"starting the owner's party ({topology.protocol.describe()}) from {args.config}", file=sys.stderr, flush=True
    )
    status = _report_parties(supervise(topology, [0], args.log_dir, args.verbose, ready, _announce))
    if failed:
        print(f"puma: error: publishing to the owner's party failed: {failed[0]}", file=sys.stderr, flush=True)
        return 1
    return status


def cmd_owner_unpublish(args) -> int:
    from puma import deploy

    removed = deploy.unpublish_from(args.config, args.model)
    print(
        f"puma: removed from {sum(bool(r['removed']) for r in removed)} of {len(removed)} parties",
        file=sys.stderr,
    )
    return 0


def cmd_node_up(args) -> int:
    from puma.runtime.config import Topology
    from puma.runtime.nodes import supervise

    topology = Topology.from_yaml(args.config)
    topology.require_separate_domains()
    print(
        f"starting {len(topology.served)} parties ({topology.protocol.describe()}) from {args.config}; "
        f"logs in {args.log_dir}; Ctrl-C stops them",
        file=sys.stderr,
        flush=True,
    )
    ranks = [p.rank for p in topology.served]  # client-server: the owner's party only
    return _report_parties(
        supervise(
            topology,
            ranks,
            args.log_dir,
            args.verbose,
            _ready_line(topology, ranks),
            _announce,
        )
    )


def cmd_node_start(args) -> int:
    from puma.runtime.config import Topology
    from puma.runtime.nodes import supervise

    topology = Topology.from_yaml(args.config)
    topology.require_separate_domains()
    if not 0 <= args.rank < len(topology.served):
        if topology.client_server:
            raise PumaError(f"--rank {args.rank}: in client-server mode only the owner's party (rank 0) is served")
        raise PumaError(f"--rank {args.rank} is not in {args.config} (0..{topology.world_size - 1})")
    return _report_parties(
        supervise(
            topology,
            [args.rank],
            args.log_dir,
            args.verbose,
            _ready_line(topology, [args.rank]),
            _announce,
        )
    )


def cmd_node_certs(args) -> int:
    from puma.runtime import certs
    from puma.runtime.config import Topology

    if args.days < 1:
        raise PumaError(f"--days must be at least 1 (got {args.days})")
    clients = tuple(args.client)
    for path in certs.make(args.config, args.days, args.force, clients):
        print(path)
    topology = Topology.from_yaml(args.config)
    folder = topology.tls.dir
    print(
        f"puma: certificates for {args.config} written to {folder}; each host needs (from there):",
        file=sys.stderr,
    )
    for who, paths in certs.needs(topology, clients):
        print(
            f"  {who}: {' '.join(os.path.relpath(p, folder) for p in paths)}",
            file=sys.stderr,
        )
    print(
        "puma: ca.key and links-ca.key only make certificates: keep them off every host",
        file=sys.stderr,
    )
    unlisted = [name for name in clients if name not in topology.clients]
    if unlisted:
        print(
            f"puma: the parties admit {', '.join(unlisted)} only once listed in the topology's clients",
            file=sys.stderr,
        )
    return 0


def _ready_line(topology, ranks: list[int]):
    """Prints, once the parties accept jobs, where each one listens."""
    parties = [topology.parties[r] for r in ranks]
    line = "; ".join(f"{p.id} (rank {p.rank}): control {p.control}, link {p.link}" for p in parties)
    return lambda: print(f"puma: ready: {line}", file=sys.stderr, flush=True)


def _announce(line: str) -> None:
    print(f"puma: {line}", file=sys.stderr, flush=True)


def _report_parties(outcome: tuple[int, str | None]) -> int:
    status, message = outcome
    if message:
        print(f"puma: error: {message}", file=sys.stderr, flush=True)
    elif status == 0:
        print("puma: parties stopped", file=sys.stderr, flush=True)
    return status
