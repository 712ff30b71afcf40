"""Deployment drills for the nodes backend: the fault matrix and a job soak.

    python scripts/fault_drills.py [--out bench-results/faults.json] [--jobs 50] [--resume]

Same as ``puma bench faults`` (see puma/bench/faults.py).
"""

import sys

from puma.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "faults", *sys.argv[1:]]))
