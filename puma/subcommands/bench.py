"""``puma bench NAME`` for every benchmark of :data:`puma.bench.REGISTRY`, and ``puma bench report``."""

from __future__ import annotations

import os
import sys

from puma.errors import PumaError


def add_parsers(sub, common) -> None:
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
            nargs="?",
            const="all",
            choices=("all", "uncontended"),
            help="reuse the cells --out already holds and measure only the rest; '--resume uncontended' also "
            "measures again the cells whose seconds other processes contended (default: measure every cell)",
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
            f"puma: reused {reused} cell(s) already in {args.out} "
            + ("(--resume)" if args.resume else "(measured earlier in this run)"),
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
