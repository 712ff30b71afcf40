"""Accuracy suites: plaintext-exact vs each approximation set under MPC on the shipped data.

    python scripts/bench_accuracy.py [--suites stories wikitext fxp sst2] [--sets puma puma-fast]

Same as ``puma bench accuracy``. Needs ../shared/data (or --data). Writes bench-results/accuracy.json
(--resume reuses its cells) and prints Markdown tables.
"""

import sys

from puma.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "accuracy", *sys.argv[1:]]))
