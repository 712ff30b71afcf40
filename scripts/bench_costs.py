"""Cost tables beside the PUMA paper: total communication, send actions and time per model.

    python scripts/bench_costs.py [--rows bert-base gpt2 ...] [--sets puma-fast puma] [--sizes 128 32+1]

Same as ``puma bench costs``. Models too large for this machine are composed from exact per-layer
runs (see puma/bench/costs.py). Writes bench-results/costs.json (--resume reuses its cells), prints Markdown.
"""

import sys

from puma.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "costs", *sys.argv[1:]]))
