"""A published model on nodes: first vs second query of a client, clients queued at once.

    python scripts/bench_serving.py [--models stories260K gpt2] [--clients 3] [--resume]

Same as ``puma bench serving`` (see puma/bench/serving.py).
"""

import sys

from puma.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "serving", *sys.argv[1:]]))
