"""Latency per token: prefill and decode steps, a decode step by model site, first token cold and warm.

    python scripts/bench_latency.py [--models stories260K smollm2-135m] [--sets puma-fast] [--decode-steps 4]

Same as ``puma bench latency``. Writes bench-results/latency.json (--resume reuses its cells) and prints Markdown
tables.
"""

import sys

from puma.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "latency", *sys.argv[1:]]))
