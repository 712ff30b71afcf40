"""PUMA's own code path and SPU's example setup beside puma's sets, in one run.

    python scripts/bench_peers.py [--rows gpt2 bert-base llama-7b-layer] [--sets puma puma-fast]

Same as ``puma bench peers`` (see puma/bench/peers.py). Writes bench-results/peers.json
(--resume reuses its rows), prints Markdown.
"""

import sys

from puma.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "peers", *sys.argv[1:]]))
