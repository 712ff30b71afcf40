"""Private generation: bytes per prefill and decode step, with and without the secure KV cache.

    python scripts/bench_generation.py [--models gpt2 stories260K llama-7b-layer] [--sets puma puma-fast]

Same as ``puma bench generation``. Writes bench-results/generation.json (--resume reuses its cells) and prints a
Markdown table.
"""

import sys

from puma.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "generation", *sys.argv[1:]]))
