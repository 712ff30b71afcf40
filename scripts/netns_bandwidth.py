"""Check the bandwidth term of the network time model with parties in rate-limited namespaces.

    sudo python scripts/netns_bandwidth.py [--preset bert-base] [--size 128] [--layers 2] [--rate-mbit 200]

Runs the model on the nodes backend twice, each party in its own network namespace: unlimited,
then with every party's egress limited by tc tbf; compares the limited run with the model's
prediction (see puma/bench/netns.py). Writes bench-results/network.json.
"""

import argparse
import json
import os
import sys

from puma.bench import netns
from puma.bench.report import environment


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bert-base")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rate-mbit", type=int, default=200)
    parser.add_argument("--approx", default="puma-fast")
    parser.add_argument("--out", default="bench-results/network.json")
    args = parser.parse_args(argv)
    result = netns.validate(args.preset, args.size, args.approx, args.rate_mbit, args.layers)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": environment(), "result": result}, f, indent=1)
    print(json.dumps(result, indent=1))
    return 0 if result["within_15_percent"] else 1


if __name__ == "__main__":
    sys.exit(main())
