"""Approximation sets side by side: function errors and costs, model fidelity under MPC.

    python scripts/bench_protocols.py [--sets puma puma-fast mpcformer spu] [--out bench-results/protocols.json]

Same as ``puma bench protocols``. Resumes from the JSON's completed cells; prints Markdown tables.
"""

import sys

from puma.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "protocols", *sys.argv[1:]]))
