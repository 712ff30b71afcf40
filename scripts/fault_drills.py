"""Deployment drills for the nodes backend: the fault matrix and a 50-job soak.

    python scripts/fault_drills.py [--out bench-results/faults.json] [--jobs 50] [--fresh]

Starts local parties in both layouts (puma node up / puma node start), kills each rank at each
phase of a job, records the driver's error and whether the parties served the next job, then
runs the soak. Writes JSON (resumable), prints Markdown. See puma/bench/faults.py.
"""

import argparse
import sys

from puma.bench import faults


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results/faults.json")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--fresh", action="store_true", help="ignore completed cases in --out")
    args = parser.parse_args(argv)
    print(faults.markdown(faults.run(args.out, args.jobs, resume=not args.fresh)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
