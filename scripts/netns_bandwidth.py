"""Check the bandwidth term of the network time model with parties in rate-limited namespaces.

    sudo python scripts/netns_bandwidth.py [--preset bert-base] [--size 128] [--layers 2] [--rate-mbit 200]

Same as ``puma bench network`` (see puma/bench/netns.py). Writes bench-results/network.json.
"""

import sys

from puma.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "network", *sys.argv[1:]]))
