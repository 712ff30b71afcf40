"""Command-line options shared by ``puma``'s commands and its benchmarks: defined once, each with
its help and its default."""

from __future__ import annotations

import argparse


def size(text: str) -> int:
    """``16G``, ``512M`` or bytes."""
    from puma.runtime.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def network(text: str) -> str:
    """``lan``, ``wan`` or ``BANDWIDTH,RTT``."""
    from puma import network as networks

    try:
        networks.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def positive(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        choices=("auto", "resident", "streamed"),
        default="auto",
        help="resident: share the weights once and keep them; streamed: share each stage's weights just "
        "before it runs and drop them after (any model size); auto: resident if the shares fit "
        "--memory-budget (default: %(default)s)",
    )
    p.add_argument(
        "--memory-budget",
        type=size,
        help="memory the weights may take per process (a party process; in sim and plaintext this process), "
        "e.g. 16G (default: 80%% of the available memory, split between the parties on one host)",
    )


def add_bench_backend_args(p: argparse.ArgumentParser) -> None:
    """Where a benchmark's parties are: ``--backend``, ``--config``, ``--ray-address``, ``--ray-token``."""
    from puma.runtime import BACKENDS

    secure = [name for name, b in BACKENDS.items() if b.module is not None]
    p.add_argument("--backend", default="sim", choices=secure, help="secure backend (default: %(default)s)")
    p.add_argument("--config", "-c", help="party topology file; required by --backend nodes (default: none)")
    p.add_argument("--ray-address", help="address of an existing Ray cluster (default: start one locally)")
    p.add_argument("--ray-token", help="token of a Ray cluster with token authentication (default: none)")


def connect(args) -> dict:
    """Where a benchmark's parties are; ``nodes`` without a topology is one line now, not one
    per cell."""
    from puma.errors import PumaError
    from puma.runtime import get_backend

    if get_backend(args.backend).needs_topology and not args.config:
        raise PumaError(f"--backend {args.backend} needs the parties' topology: pass --config configs/3pc.yaml")
    return {"config": args.config, "ray_address": args.ray_address, "ray_token": args.ray_token}


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--require-quiet",
        action="store_true",
        help="wait for other processes to go quiet before each timed cell (up to 10 minutes), else stop "
        "(default: measure at once; cells measured under load are marked contended)",
    )


def add_data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="offline data folder (default: ../shared/data)")


def add_sets_arg(p: argparse.ArgumentParser, default: list[str]) -> None:
    from puma import protocols

    p.add_argument(
        "--sets",
        nargs="+",
        default=default,
        choices=protocols.names(),
        help="approximation sets (default: %(default)s)",
    )
